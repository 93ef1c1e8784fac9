//! Kernel launches: the argument kinds and the launch of a compiled kernel by name on the stream.

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::{device_error, Cuda};

/// A kernel argument.
#[derive(Clone, Copy)]
pub(super) enum A {
    /// A device pointer (0 for "none").
    P(u64),
    I(i32),
    L(i64),
    F(f32),
}

impl Cuda {
    /// The device address of a buffer.
    pub(super) fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.0.stream).0
    }

    /// A buffer as a kernel argument.
    pub(super) fn p<T>(&self, s: &CudaSlice<T>) -> A {
        A::P(self.ptr(s))
    }

    pub(super) fn opt<T>(&self, s: Option<&CudaSlice<T>>) -> A {
        s.map_or(A::P(0), |s| self.p(s))
    }

    pub(super) fn launch(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[A]) {
        self.launch_shared(name, grid, block, 0, args)
    }

    /// [`Cuda::launch`] with `shared` bytes of dynamic shared memory per block.
    pub(super) fn launch_shared(&self, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), shared: u32, args: &[A]) {
        if self.failed() {
            return;
        }
        let Some(f) = self.0.funcs.get(name) else {
            return self.fail(device_error(name, "the kernel is missing from the compiled modules"));
        };
        let mut b = self.0.stream.launch_builder(f);
        for a in args {
            match a {
                A::P(p) => b.arg(p),
                A::I(v) => b.arg(v),
                A::L(v) => b.arg(v),
                A::F(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: shared };
        // SAFETY: each call site passes the arguments of the kernel's signature in kernels/*.cu,
        // with buffers of the sizes the op's contract gives.
        if let Err(e) = unsafe { b.launch(cfg) } {
            self.fail(device_error(name, e));
        }
    }

    /// An elementwise kernel over `n` items: block 256, grid-stride.
    pub(super) fn launch_n(&self, name: &str, n: usize, args: &[A]) {
        let blocks = n.div_ceil(256).clamp(1, 65535) as u32;
        self.launch(name, (blocks, 1, 1), (256, 1, 1), args)
    }
}
