//! `runtime bench`: trains a few steps of a freshly initialised model on random tokens and reports
//! tokens/s, peak memory, where the time goes per op, and the matrix products' FLOP rate against
//! the machine's single-precision GEMM rate measured in the same run.

use std::time::Instant;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;

use crate::backend::cpu::Cpu;
use crate::backend::profiled::Profiled;
use crate::backend::{AttnImpl, Backend};
use crate::commands::{parse_attn, parse_device};
use crate::engine::{AdamWConfig, Step};
use crate::error::Result;
use crate::model::{init::init_tensors, Batch, LoadOptions, LossOptions, Model, ModelConfig, Selected};

mod limits;
mod measured;
pub use measured::{run_cuda_profiled, run_profiled, run_roofline, RooflineResult};

/// `runtime bench`'s arguments.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// gpt2, llama or t5 (T5 v1.1: n_layer encoder and n_layer decoder layers, d_ff = 2 x hidden,
    /// targets of seq / 2 tokens; CPU only)
    #[arg(long, default_value = "gpt2")]
    pub arch: String,
    #[arg(long = "n_layer", default_value_t = 6)]
    pub n_layer: usize,
    #[arg(long, default_value_t = 384)]
    pub hidden: usize,
    #[arg(long = "n_head", default_value_t = 6)]
    pub n_head: usize,
    /// key/value heads (llama); defaults to n_head
    #[arg(long = "n_kv_head")]
    pub n_kv_head: Option<usize>,
    /// llama's MLP width (`intermediate_size`); defaults to hidden * 8 / 3
    #[arg(long)]
    pub intermediate: Option<usize>,
    #[arg(long, default_value_t = 8192)]
    pub vocab: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long = "attn_implementation", default_value = "sdpa")]
    pub attn_implementation: String,
    /// keep only layer inputs and recompute each layer in the backward pass
    #[arg(long = "gradient_checkpointing")]
    pub gradient_checkpointing: bool,
    /// rows per chunk of the LM head and loss (0: one chunk, the whole logits at once;
    /// default: as many rows as keep a chunk's logits within the backend's budget: 16 MiB on
    /// the CPU, at least 512 rows while they fit in 128 MiB; 512 MiB on a GPU)
    #[arg(long = "loss_chunk_rows")]
    pub loss_chunk_rows: Option<usize>,
    /// Train a LoRA adapter of this rank on every linear module (alpha 2r) instead of every weight.
    #[arg(long = "lora_r")]
    pub lora_r: Option<usize>,
    /// bfloat16: the weights rounded to bf16 (as `from_pretrained(torch_dtype=torch.bfloat16)`
    /// holds them); with `--lora_r` on the CPU the frozen base is then held in bf16
    #[arg(long = "torch_dtype")]
    pub torch_dtype: Option<String>,
    /// print the result as one JSON object
    #[arg(long)]
    pub json: bool,
    /// benchmark generation instead: greedy decoding of this many new tokens with the KV
    /// cache (batch `--batch`, random prompts of `--prompt` tokens)
    #[arg(long)]
    pub decode: Option<usize>,
    #[arg(long, default_value_t = 32)]
    pub prompt: usize,
    /// cpu (default) or cuda
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// bf16 mixed precision (CUDA)
    #[arg(long)]
    pub bf16: bool,
    /// with --device cuda: account one step of the CUDA backend op by op on this chip (h100,
    /// h200, a100) instead of running it: bytes, FLOPs, modeled time and MFU; no GPU needed
    #[arg(long)]
    pub roofline: Option<String>,
    /// with --device cuda: time each op, waiting for the device after each (per-op shares)
    #[arg(long)]
    pub profile: bool,
    /// under an MPI launcher: `shard_grad_op` shards the optimizer over the processes (ZeRO-2),
    /// `full_shard` the weights too (ZeRO-3)
    #[arg(long, default_value = "")]
    pub fsdp: String,
}

impl BenchArgs {
    /// Runs the benchmark the arguments ask for and prints its report.
    pub fn run(self) -> anyhow::Result<()> {
        let BenchArgs {
            arch,
            n_layer,
            hidden,
            n_head,
            n_kv_head,
            intermediate,
            vocab,
            seq,
            batch,
            steps,
            warmup,
            attn_implementation,
            gradient_checkpointing,
            loss_chunk_rows,
            lora_r,
            torch_dtype,
            json,
            decode,
            prompt,
            device,
            bf16,
            roofline,
            profile,
            fsdp,
        } = self;
        anyhow::ensure!(steps.checked_add(warmup).is_some(), "--steps plus --warmup is beyond any count of steps");
        if arch == "t5" {
            limits::refuse_unused(
                "the T5 benchmark (training on the CPU)",
                &[
                    ("--device", device != "cpu"),
                    ("--roofline", roofline.is_some()),
                    ("--decode", decode.is_some()),
                    ("--bf16", bf16),
                    ("--profile", profile),
                    ("--fsdp", !fsdp.is_empty()),
                    ("--lora_r", lora_r.is_some()),
                    ("--torch_dtype", torch_dtype.is_some()),
                    ("--n_kv_head", n_kv_head.is_some()),
                    ("--intermediate", intermediate.is_some()),
                    ("--attn_implementation", attn_implementation != "sdpa"),
                    ("--gradient_checkpointing", gradient_checkpointing),
                    ("--loss_chunk_rows", loss_chunk_rows.is_some()),
                ],
            )?;
            anyhow::ensure!(
                steps > 0 && batch > 0 && seq >= 2 && n_head > 0 && hidden % n_head == 0 && vocab >= 3,
                "--steps, --batch, --n_head >= 1, --seq >= 2, --vocab >= 3, --hidden a multiple of --n_head"
            );
            let tokens = limits::tokens(batch, Some(seq), "--batch x --seq")?;
            // the embedding and, per layer pair, at least 8 hidden x hidden products; AdamW's 16
            // bytes a parameter; at least 4 values a token per layer and hidden unit
            let params = (vocab as u128 + 8 * n_layer as u128 * hidden as u128) * hidden as u128;
            limits::memory(16 * params + 16 * tokens * hidden as u128 * 2 * n_layer as u128, "the T5 benchmark")?;
            let shape = crate::tools::seq2seq::BenchShape { n_layer, d_model: hidden, n_head, vocab, src_len: seq, tgt_len: seq / 2, batch, steps, warmup };
            let r = crate::tools::seq2seq::bench(&shape)?;
            println!("{}", if json { serde_json::to_string(&r)? } else { r.report() });
            return Ok(());
        }
        if arch != "gpt2" && arch != "llama" {
            anyhow::bail!("unknown --arch `{arch}` (expected gpt2, llama or t5)");
        }
        if steps == 0 || batch == 0 || seq < 2 {
            anyhow::bail!("--steps and --batch must be at least 1 and --seq at least 2");
        }
        let cfg = BenchConfig {
            arch,
            n_layer,
            hidden,
            n_head,
            n_kv_head: n_kv_head.unwrap_or(n_head),
            intermediate,
            vocab,
            seq,
            batch,
            steps,
            warmup,
            attn: parse_attn(&attn_implementation)?,
            gradient_checkpointing,
            loss_chunk_rows: loss_chunk_rows.map(|n| if n == 0 { batch * seq } else { n }),
            lora_r,
            torch_dtype: torch_dtype
                .as_deref()
                .map(|d| crate::model::Dtype::parse(d).ok_or_else(|| anyhow::anyhow!("--torch_dtype `{d}`: expected float32, float16 or bfloat16")))
                .transpose()?,
            shard: match fsdp.as_str() {
                "" => 0,
                "shard_grad_op" => 2,
                "full_shard" => 3,
                other => anyhow::bail!("--fsdp `{other}`: expected shard_grad_op, full_shard (or nothing)"),
            },
        };
        if let Some(new_tokens) = decode {
            if new_tokens == 0 || prompt == 0 {
                anyhow::bail!("--decode and --prompt must be at least 1");
            }
            limits::refuse_unused(
                "--decode (greedy decoding on the CPU)",
                &[
                    ("--device", device != "cpu"),
                    ("--roofline", roofline.is_some()),
                    ("--bf16", bf16),
                    ("--profile", profile),
                    ("--fsdp", !fsdp.is_empty()),
                    ("--lora_r", lora_r.is_some()),
                    ("--torch_dtype", cfg.torch_dtype.is_some()),
                    ("--gradient_checkpointing", gradient_checkpointing),
                    ("--loss_chunk_rows", loss_chunk_rows.is_some()),
                ],
            )?;
            let tokens = limits::tokens(batch, prompt.checked_add(new_tokens), "--batch x (--prompt + --decode)")?;
            let mcfg = cfg.model_config()?;
            // the f32 weights and at least the key/value cache
            let cache = tokens * 2 * (mcfg.n_kv_head * mcfg.head_dim) as u128 * mcfg.n_layer as u128;
            limits::memory(4 * (mcfg.implied_parameters() + cache), "the decoding benchmark")?;
            let r = run_decode(&cfg, prompt, new_tokens)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} ({} parameters), batch {}, prompt {} tokens, {} new tokens, {} threads\n  decode {:.0} tokens/s, end to end {:.0} tokens/s (prefill {:.1} ms)",
                    r.arch, r.parameters, r.batch, r.prompt_tokens, r.new_tokens, r.threads, r.decode_tokens_per_second, r.end_to_end_tokens_per_second, r.prefill_seconds * 1e3
                );
                let mut ops = r.ops.clone();
                ops.sort_by(|a, b| b.1.total_cmp(&a.1));
                println!("  op time: {}", ops.iter().filter(|o| o.1 >= 0.005).map(|(k, v)| format!("{k} {:.0}%", v * 100.0)).collect::<Vec<_>>().join(", "));
            }
            return Ok(());
        }
        let tokens = limits::tokens(batch, Some(seq), "--batch x --seq")?;
        let mcfg = cfg.model_config()?;
        if let Some(name) = roofline {
            let chip =
                crate::backend::roofline::chip(&name).ok_or_else(|| anyhow::anyhow!("unknown --roofline chip `{name}` (expected h100, h200 or a100)"))?;
            anyhow::ensure!(device == "cuda", "--roofline accounts the CUDA backend: add --device cuda");
            anyhow::ensure!(n_layer <= limits::MAX_ROOFLINE_LAYERS, "--roofline accounts at most {} layers", limits::MAX_ROOFLINE_LAYERS);
            // the account holds the batch's token ids, labels and mask
            limits::memory(16 * tokens, "the roofline account")?;
            let r = run_roofline(&cfg, chip, bf16)?;
            println!("{}", if json { serde_json::to_string(&r)? } else { r.report() });
            return Ok(());
        }
        let r = match parse_device(&device)?.select(bf16)? {
            Selected::Cpu if bf16 => anyhow::bail!("--bf16 needs --device cuda"),
            Selected::Cpu => {
                // weights, gradients and AdamW's moments (16 bytes a parameter; with a LoRA
                // adapter at least the weights), and at least 4 values a token per layer and
                // hidden unit (a GPU run's out of memory is an error of its own)
                let activations = 16 * tokens * mcfg.hidden_size as u128 * mcfg.n_layer as u128;
                let state = match lora_r {
                    // the frozen base, and the adapter's A and B on at least q and v: 2 r x hidden
                    // each a layer, trained
                    Some(r) => 4 * mcfg.implied_parameters() + 16 * 4 * r as u128 * mcfg.hidden_size as u128 * mcfg.n_layer as u128,
                    None => 16 * mcfg.implied_parameters(),
                };
                limits::memory(state + activations, "the training benchmark")?;
                run(&cfg)?
            }
            Selected::Cuda(cuda) if profile => run_cuda_profiled(&cfg, cuda)?,
            Selected::Cuda(cuda) => run_cuda(&cfg, cuda)?,
        };
        // across processes (`mpirun -np N runtime bench`: the training step, data parallel), rank 0 reports
        if crate::engine::mpi::launcher_rank().unwrap_or(0) == 0 {
            println!("{}", if json { serde_json::to_string(&r)? } else { r.report(cfg.batch, cfg.seq) });
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// `gpt2` or `llama`.
    pub arch: String,
    pub n_layer: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    /// Llama's `intermediate_size` (`None`: `hidden * 8 / 3`).
    pub intermediate: Option<usize>,
    pub vocab: usize,
    pub seq: usize,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub attn: AttnImpl,
    pub gradient_checkpointing: bool,
    /// [`Model::loss_chunk_rows`] (`None`: automatic).
    pub loss_chunk_rows: Option<usize>,
    /// A LoRA adapter of this rank on every linear module (alpha 2r), the base frozen.
    pub lora_r: Option<usize>,
    /// The weights rounded to this dtype (`from_pretrained(torch_dtype=...)`); bf16 with
    /// `lora_r` on the CPU holds the frozen base in bf16.
    pub torch_dtype: Option<crate::model::Dtype>,
    /// The ZeRO stage over the processes of a data parallel run: 0 none, 2 the optimizer and
    /// gradients sharded, 3 the weights too.
    pub shard: u8,
}

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub arch: String,
    pub parameters: usize,
    pub tokens_per_step: usize,
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    pub peak_rss_mib: f64,
    /// The peak RSS during the timed steps alone (Linux; NaN elsewhere): without the start's
    /// model building.
    pub steps_peak_rss_mib: f64,
    /// Weights, gradients and optimizer moments this process holds after the steps (with
    /// `fsdp`, its shards of them).
    pub state_mib: f64,
    /// Activation and scratch buffers of the step (what gradient checkpointing reduces).
    pub activation_mib: f64,
    pub matmul_share: f64,
    pub matmul_gflops: f64,
    pub machine_gemm_gflops: f64,
    pub ops: Vec<(String, f64)>,
    /// With `--profile`: timed calls per step of each op kind in `ops`, and the round trip of one
    /// wait for an idle device, part of each call's time ([`Profiled::idle_sync_seconds`]).
    pub op_calls_per_step: Vec<(String, f64)>,
    pub sync_seconds: f64,
    pub threads: usize,
    pub final_loss: f32,
    pub device: String,
}

impl BenchResult {
    /// The human-readable report of a run of `batch` x `seq` tokens per step (no trailing newline).
    pub fn report(&self, batch: usize, seq: usize) -> String {
        let mut s = format!("{} ({} parameters), batch {batch} x seq {seq}, {} threads\n", self.arch, self.parameters, self.threads);
        s += &format!(
            "  {:.0} tokens/s, {:.3} s/step, peak RSS {:.0} MiB (activations {:.0} MiB; weights, gradients and moments {:.0} MiB), final loss {:.4}\n",
            self.tokens_per_second, self.step_seconds, self.peak_rss_mib, self.activation_mib, self.state_mib, self.final_loss
        );
        s += &format!(
            "  matmul {:.1} GFLOP/s = {:.0}% of this machine's GEMM rate ({:.1} GFLOP/s)\n",
            self.matmul_gflops,
            100.0 * self.matmul_gflops / self.machine_gemm_gflops,
            self.machine_gemm_gflops
        );
        s += "  share of step time:";
        let mut ops = self.ops.clone();
        ops.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (op, share) in ops {
            s += &format!("\n    {op:<14} {:5.1}%", share * 100.0);
        }
        s
    }
}

impl BenchConfig {
    pub fn model_config(&self) -> Result<ModelConfig> {
        let raw = match self.arch.as_str() {
            "gpt2" => json!({
                "model_type": "gpt2", "n_layer": self.n_layer, "n_embd": self.hidden, "n_head": self.n_head,
                "vocab_size": self.vocab, "n_positions": self.seq.max(1024),
            }),
            _ => json!({
                "model_type": "llama", "num_hidden_layers": self.n_layer, "hidden_size": self.hidden,
                "num_attention_heads": self.n_head, "num_key_value_heads": self.n_kv_head, "vocab_size": self.vocab,
                // the same parameter count as GPT-2's 4x MLP: 3 * I * C = 8 * C^2
                "intermediate_size": self.intermediate.unwrap_or(self.hidden * 8 / 3), "max_position_embeddings": self.seq.max(1024),
            }),
        };
        let serde_json::Value::Object(map) = raw else { unreachable!("a JSON object literal") };
        ModelConfig::from_json(std::path::Path::new("<bench>"), map)
    }
}

/// The best wall time of `reps` runs of `f`, after one warm-up run (for the benchmark examples).
pub fn best_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
pub use crate::mem::peak_rss_mib;

/// The single-precision GEMM rate of this machine through the CPU backend's GEMM, in GFLOP/s
/// (a square product of side `n`, best of `reps`).
pub fn machine_gemm_gflops(n: usize, reps: usize) -> f64 {
    let be = Cpu;
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
    let b = a.clone();
    let mut c = vec![0.0f32; n * n];
    let best = best_seconds(reps, || be.matmul_fwd(&mut c, &a, &b, None, n, n, n));
    2.0 * (n * n * n) as f64 / best / 1e9
}

pub fn run(cfg: &BenchConfig) -> Result<BenchResult> {
    let be = Profiled::new(Cpu);
    let (mut r, model) = train_steps(be, cfg, |b| b.reset())?;
    let (ops, flops) = model.backend.report();
    let elapsed = r.step_seconds * cfg.steps as f64;
    let matmul_secs = ops.iter().find(|o| o.0 == "matmul").map_or(0.0, |o| o.1);
    r.matmul_share = matmul_secs / elapsed;
    r.matmul_gflops = flops / matmul_secs / 1e9;
    r.machine_gemm_gflops = machine_gemm_gflops(2048, 5);
    r.ops = ops.into_iter().map(|(k, v)| (k.to_string(), v / elapsed)).collect();
    Ok(r)
}

/// The training benchmark on a CUDA device: steps are timed whole (the ops stay queued, so
/// there is no per-op table); memory is the device's in use after the steps.
pub fn run_cuda(cfg: &BenchConfig, be: crate::backend::cuda::Cuda) -> Result<BenchResult> {
    let (mut r, model) = train_steps(be, cfg, |_| {})?;
    let be = &model.backend;
    r.peak_rss_mib = be.memory_used().0 as f64 / (1024.0 * 1024.0);
    // the rate of this backend's own product (operands cast to bf16 when in bf16 mode)
    let n = 8192;
    let a = be.upload(&vec![0.01f32; n * n])?;
    let mut c = be.zeros(n * n)?;
    let best = best_seconds(5, || {
        be.matmul_fwd(&mut c, &a, &a, None, n, n, n);
        // a failure is sticky: the check after the timing reports it
        let _ = be.synchronize();
    });
    be.synchronize()?;
    r.machine_gemm_gflops = 2.0 * (n * n * n) as f64 / best / 1e9;
    Ok(r)
}

/// Warm-up and timed steps (forward, backward, clipping, AdamW) of a freshly initialised model
/// on random tokens; the per-op fields are left for the caller.
fn train_steps<B: Backend>(be: B, cfg: &BenchConfig, on_warm: impl Fn(&B)) -> Result<(BenchResult, Model<B>)> {
    let mcfg = cfg.model_config()?;
    let layout = crate::model::Layout::new(&mcfg);
    // in a data parallel run (`mpirun -np N runtime bench`) each process steps its own batch
    let collective = crate::engine::mpi::start(None, None)?;
    // with the weights sharded each tensor is cut as it is made: no process holds the whole model
    let mut stash = (cfg.shard == 3).then(|| crate::engine::full_shard::PieceStash::new(&layout, collective.rank(), collective.world_size()));
    let mut keep = |i: usize, t: Vec<f32>| match &mut stash {
        Some(s) => s.keep(i, t),
        None => t,
    };
    let opts = LoadOptions { attn_implementation: cfg.attn, torch_dtype: cfg.torch_dtype, ..LoadOptions::default() };
    let init = mcfg.clone();
    let round = |put: &mut dyn FnMut(usize, Vec<f32>) -> Result<()>| {
        crate::model::init::init_each(&init, &layout, 42, &mut |i, mut t| {
            if let Some(dt) = cfg.torch_dtype {
                dt.round(&mut t);
            }
            put(i, t)
        })
    };
    let mut model = Model::from_each(be, mcfg, opts, round, &mut keep)?;
    model.gradient_checkpointing = cfg.gradient_checkpointing;
    model.loss_chunk_rows = cfg.loss_chunk_rows;
    if let Some(r) = cfg.lora_r {
        let peft = serde_json::json!({"r": r, "lora_alpha": 2 * r, "target_modules": "all-linear"});
        let lora = crate::model::lora::LoraConfig::from_map(peft.as_object().expect("an object"), "bench")?;
        model.add_lora(lora, None, 0)?;
        model.hold_frozen_base()?;
    }
    crate::mem::release_free_memory();
    let (rank, world) = (collective.rank(), collective.world_size());
    let mut rng = ChaCha8Rng::seed_from_u64(7 + rank as u64);
    let rows = cfg.batch * cfg.seq;
    let ids: Vec<i32> = (0..rows).map(|_| rng.random_range(0..cfg.vocab as i32)).collect();
    let batch = Batch { batch: cfg.batch, seq: cfg.seq, input_ids: ids.clone(), labels: Some(ids), ..Batch::default() };
    let opt = AdamWConfig { lr: 3e-4, weight_decay: 0.01, ..AdamWConfig::default() };
    let mut step = match cfg.shard {
        2 => Step::sharded(model, opt, collective, cfg.batch, cfg.seq)?,
        3 => Step::fully_sharded(model, opt, collective, cfg.batch, cfg.seq, stash)?,
        _ => {
            let mut step = Step::with_workspace(model, opt, cfg.batch, cfg.seq)?;
            step.collective = collective;
            step
        }
    };
    let window = [batch];
    let mut loss = f32::NAN;
    let mut elapsed = 0.0;
    let mut start_peak = f64::NAN;
    for i in 0..cfg.warmup + cfg.steps {
        if i == cfg.warmup {
            step.model.backend.synchronize()?;
            on_warm(&step.model.backend);
            // the peak so far, then a fresh peak for the timed steps (Linux: `5` resets VmHWM)
            start_peak = peak_rss_mib();
            if !crate::mem::reset_peak_rss() {
                start_peak = f64::NAN;
            }
        }
        let t = Instant::now();
        loss = step.run(&window, LossOptions::default(), 3e-4, 1.0)?.loss as f32;
        step.model.backend.synchronize()?;
        if i >= cfg.warmup {
            elapsed += t.elapsed().as_secs_f64();
        }
    }
    let state_mib = step.state_bytes()? as f64 / (1024.0 * 1024.0);
    let Step { model, acts, .. } = step;
    let step_seconds = elapsed / cfg.steps as f64;
    let r = BenchResult {
        arch: cfg.arch.clone(),
        parameters: model.num_parameters(),
        tokens_per_step: rows * world,
        step_seconds,
        tokens_per_second: (rows * world) as f64 / step_seconds,
        peak_rss_mib: peak_rss_mib().max(start_peak),
        steps_peak_rss_mib: if start_peak.is_nan() { f64::NAN } else { peak_rss_mib() },
        state_mib,
        activation_mib: acts.bytes(&model.backend) as f64 / (1024.0 * 1024.0),
        matmul_share: f64::NAN,
        matmul_gflops: f64::NAN,
        machine_gemm_gflops: f64::NAN,
        ops: Vec::new(),
        op_calls_per_step: Vec::new(),
        sync_seconds: f64::NAN,
        threads: rayon::current_num_threads(),
        final_loss: loss,
        device: model.backend.name().to_string(),
    };
    Ok((r, model))
}

/// What `runtime bench --decode N` measures: greedy decoding with the KV cache on a freshly
/// initialised model, a batch of random prompts.
#[derive(Debug, Serialize)]
pub struct DecodeResult {
    pub arch: String,
    pub parameters: usize,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Generated tokens per second after the prompt (all rows).
    pub decode_tokens_per_second: f64,
    /// Generated tokens per second including the prompt's processing.
    pub end_to_end_tokens_per_second: f64,
    pub threads: usize,
    /// Share of the op time per op kind (prefill and decode of the measured runs).
    pub ops: Vec<(String, f64)>,
}

/// Greedy decoding of `new_tokens` tokens after random prompts of `prompt` tokens, batch
/// `cfg.batch` (best of `cfg.steps` runs after `cfg.warmup`).
pub fn run_decode(cfg: &BenchConfig, prompt: usize, new_tokens: usize) -> Result<DecodeResult> {
    use crate::generate::{decode_step, prefill, DecodeState};
    let mcfg = cfg.model_config()?;
    let layout = crate::model::Layout::new(&mcfg);
    let tensors = init_tensors(&mcfg, &layout, 42);
    let model = Model::from_tensors(Profiled::new(Cpu), mcfg, tensors, LoadOptions { attn_implementation: cfg.attn, ..LoadOptions::default() })?;
    let (n, v) = (cfg.batch, model.config.vocab_size);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let prompts: Vec<Vec<u32>> = (0..n).map(|_| (0..prompt).map(|_| rng.random_range(0..cfg.vocab as u32)).collect()).collect();
    let (mut best_prefill, mut best_decode) = (f64::MAX, f64::MAX);
    for run in 0..cfg.warmup + cfg.steps {
        let t = Instant::now();
        let mut st = DecodeState::new(&model, n, prompt + new_tokens)?;
        let mut logits = prefill(&model, &mut st, &prompts, 0)?;
        let prefill_s = t.elapsed().as_secs_f64();
        if run == cfg.warmup {
            model.backend.reset();
        }
        let t = Instant::now();
        for step in 0..new_tokens {
            let next: Vec<i32> = (0..n)
                .map(|b| logits[b * v..(b + 1) * v].iter().enumerate().fold((0, f32::NEG_INFINITY), |m, (i, &x)| if x > m.1 { (i, x) } else { m }).0 as i32)
                .collect();
            if step + 1 < new_tokens {
                logits = decode_step(&model, &mut st, &next, &vec![1; n])?;
            }
        }
        let decode_s = t.elapsed().as_secs_f64();
        if run >= cfg.warmup {
            best_prefill = best_prefill.min(prefill_s);
            best_decode = best_decode.min(decode_s);
        }
    }
    let generated = (n * new_tokens) as f64;
    let (ops, _) = model.backend.report();
    let total: f64 = ops.iter().map(|o| o.1).sum::<f64>().max(1e-12);
    Ok(DecodeResult {
        ops: ops.into_iter().map(|(k, v)| (k.to_string(), v / total)).collect(),
        arch: cfg.arch.clone(),
        parameters: model.num_parameters(),
        batch: n,
        prompt_tokens: prompt,
        new_tokens,
        prefill_seconds: best_prefill,
        decode_seconds: best_decode,
        decode_tokens_per_second: (n * new_tokens.saturating_sub(1)) as f64 / best_decode,
        end_to_end_tokens_per_second: generated / (best_prefill + best_decode),
        threads: rayon::current_num_threads(),
    })
}
