//! Opening a device: its context and stream, every kernel compiled (or loaded from the cache) for
//! its architecture, the cuBLASLt handle and the scratch buffers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaContext;

use super::blas::Lt;
use super::{kernels, probe, Cuda, Inner, Scratch, SUMSQ_BLOCKS};
use crate::error::{Error, Result};

impl Cuda {
    /// Opens device `ordinal`, compiles (or loads from the cache) every kernel for its
    /// architecture and creates the cuBLASLt handle.
    pub fn new(ordinal: usize, bf16: bool) -> Result<Self> {
        let info = probe(ordinal)?;
        let held = super::held::Held::from_setting(std::env::var_os(super::held::HOLDS_ENV).map(|v| v.to_string_lossy().into_owned()).as_deref())?;
        let dev_err = |e| Error::Device(format!("CUDA device {ordinal}: {e:?}"));
        let ctx = CudaContext::new(ordinal).map_err(dev_err)?;
        // one stream: stream order is the only synchronisation the ops need
        // SAFETY: called before any buffer exists.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let arch = kernels::arch_name(info.compute_capability);
        let mut funcs = HashMap::new();
        for (stem, src) in kernels::SOURCES {
            let mut m = kernels::compile_cached(stem, src, &arch, false)?;
            let load = |m: &kernels::CachedModule| ctx.load_module(cudarc::nvrtc::Ptx::from_binary(m.cubin.clone()));
            let module = match load(&m) {
                // an entry the driver refuses is compiled afresh (and the cache entry replaced)
                Err(e) if m.from_cache => {
                    tracing::warn!("the cached device code of kernels/{stem}.cu does not load ({e:?}); compiling it again");
                    m = kernels::compile_cached(stem, src, &arch, true)?;
                    load(&m)
                }
                other => other,
            }
            .map_err(|e| Error::Device(format!("loading kernels/{stem}.cu on {}: {e:?}", info.name)))?;
            let names = m.names;
            for name in names {
                let f = module.load_function(&name).map_err(|e| Error::Device(format!("kernel `{name}`: {e:?}")))?;
                funcs.insert(name, f);
            }
        }
        let smem = shared_memory(&ctx, &funcs);
        let lt = Lt::new(&stream, 32 << 20).map_err(Error::Device)?;
        let null = || stream.null::<u16>().map_err(dev_err);
        let scratch = Scratch {
            bf16: [null()?, null()?, null()?],
            delta: stream.null::<f32>().map_err(dev_err)?,
            partial: stream.alloc_zeros::<f64>(SUMSQ_BLOCKS).map_err(dev_err)?,
            adamw: None,
            padded: stream.null::<f32>().map_err(dev_err)?,
            colsum: stream.null::<f32>().map_err(dev_err)?,
            tables: [None, None],
        };
        Ok(Cuda(Arc::new(Inner {
            info,
            ctx,
            stream,
            funcs,
            lt,
            bf16,
            smem,
            deterministic: std::sync::atomic::AtomicBool::new(true),
            scratch: Mutex::new(scratch),
            weights16: Mutex::new(HashMap::new()),
            reuse: Mutex::new(Vec::new()),
            held: Mutex::new(held),
            failure: Mutex::new(None),
            failed: std::sync::atomic::AtomicBool::new(false),
            group: Mutex::new(None),
        })))
    }
}

/// The device's shared memory per block (opt-in) and per multiprocessor, with the opt-in granted
/// to the kernels that ask for more than the default 48 KiB of dynamic shared memory (the staged
/// loss). Zero when the driver does not say or refuses: those kernels are then not used.
fn shared_memory(ctx: &CudaContext, funcs: &HashMap<String, cudarc::driver::CudaFunction>) -> crate::backend::SharedMemory {
    use cudarc::driver::sys::{CUdevice_attribute as D, CUfunction_attribute as F};
    let none = crate::backend::SharedMemory { per_block: 0, per_sm: 0 };
    let (Ok(block), Ok(sm)) =
        (ctx.attribute(D::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN), ctx.attribute(D::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR))
    else {
        return none;
    };
    // the kernel's static shared memory comes out of the same opt-in
    let dynamic = block - 1024;
    let granted = dynamic > 0
        && funcs.get("cross_entropy_bf16_staged").is_some_and(|f| f.set_attribute(F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic).is_ok());
    if !granted {
        return none;
    }
    crate::backend::SharedMemory { per_block: dynamic as usize, per_sm: sm.max(0) as usize }
}
