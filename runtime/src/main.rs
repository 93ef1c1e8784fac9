//! The `runtime` command line: argument parsing and dispatch only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use runtime::bench;
use runtime::commands::{self, parse_attn, parse_device, parse_dtype, parse_shard_size};
use runtime::jobs;
use runtime::model::LoadOptions;

#[derive(Parser)]
#[command(name = "runtime", version, about = "A training runtime for Hugging Face format language models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum PluginAction {
    /// The interface version, hooks, imports and exports of a plugin, and its load time.
    Inspect { file: PathBuf },
    /// Runs each hook the plugin declares once on synthetic input; a loss hook's gradient is
    /// checked against finite differences.
    Check {
        file: PathBuf,
        /// A plugin option, `key=value` (repeatable), as `[[plugins]] options` gives them.
        #[arg(long = "option")]
        options: Vec<String>,
        /// A model or tokenizer folder whose tokenizer the plugin's `decode` uses.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// What plugins cost: a loss plugin's training step against the built-in loss (the engine
    /// benchmark's Llama shapes), a callback event, a metrics update, cold vs cached start.
    Bench {
        #[arg(long)]
        loss: Option<PathBuf>,
        #[arg(long)]
        metrics: Option<PathBuf>,
        #[arg(long)]
        callbacks: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Write a freshly initialised model (transformers' init scheme) for training from scratch.
    Init {
        /// A config.json for gpt2, llama, mistral or qwen2.
        #[arg(long)]
        config: PathBuf,
        #[arg(long = "output_dir")]
        output_dir: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// float32 (default) or bfloat16/float16: the dtype the weights are saved in.
        #[arg(long = "torch_dtype")]
        torch_dtype: Option<String>,
        #[arg(long = "max_shard_size", default_value = "5GB")]
        max_shard_size: String,
        #[arg(long = "overwrite_output_dir")]
        overwrite_output_dir: bool,
    },
    /// Show a model folder: architecture, module tree with shapes, parameter counts, dtypes, device.
    Inspect {
        dir: PathBuf,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Load a model folder and save it again: change the dtype or the sharding.
    Convert {
        #[arg(long)]
        model: PathBuf,
        #[arg(long = "output_dir")]
        output_dir: PathBuf,
        #[arg(long = "torch_dtype")]
        torch_dtype: Option<String>,
        #[arg(long = "max_shard_size", default_value = "5GB")]
        max_shard_size: String,
        #[arg(long = "overwrite_output_dir")]
        overwrite_output_dir: bool,
    },
    /// Fold a LoRA adapter into its base and write a plain HF model (PEFT's `merge_and_unload`):
    /// `runtime merge --model BASE --adapter DIR --output_dir OUT`.
    Merge {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long = "output_dir")]
        output_dir: PathBuf,
        #[arg(long = "torch_dtype")]
        torch_dtype: Option<String>,
        #[arg(long = "max_shard_size", default_value = "5GB")]
        max_shard_size: String,
        #[arg(long = "overwrite_output_dir")]
        overwrite_output_dir: bool,
    },
    /// Run one forward pass on a batch stored as safetensors (input_ids, attention_mask, labels)
    /// and write the logits (and loss) as safetensors.
    Forward {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// A PEFT LoRA adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long = "attn_implementation", default_value = "sdpa")]
        attn_implementation: String,
        #[arg(long = "torch_dtype")]
        torch_dtype: Option<String>,
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Show what the model's tokenizer does with a text: tokens, ids, special tokens, the decode
    /// round trip, and with --padding the padded batch and attention mask.
    Tokenize {
        /// A model folder with tokenizer.json (and tokenizer_config.json).
        #[arg(long)]
        model: PathBuf,
        /// A text to tokenize (repeatable).
        #[arg(long)]
        text: Vec<String>,
        /// A file whose lines are tokenized, one text per line.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Do not add the tokenizer's special tokens (add_special_tokens=False).
        #[arg(long = "no_special_tokens")]
        no_special_tokens: bool,
        /// longest, max_length or do_not_pad: collate the texts into one batch.
        #[arg(long)]
        padding: Option<String>,
        #[arg(long = "max_length")]
        max_length: Option<usize>,
        #[arg(long)]
        truncation: bool,
        #[arg(long = "pad_to_multiple_of")]
        pad_to_multiple_of: Option<usize>,
        /// left or right (default: the tokenizer's padding_side).
        #[arg(long = "padding_side")]
        padding_side: Option<String>,
    },
    /// Train (or fine-tune) a model: `runtime train --config run.toml [--name value ...]` with
    /// TrainingArguments under their HF names.
    Train {
        /// A TOML, JSON or YAML file of TrainingArguments.
        #[arg(long)]
        config: Option<PathBuf>,
        /// `--name value` settings that override the file (HF names).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
    },
    /// Generate a self-contained example (data, tokenizer, model config, run config):
    /// `runtime example addition --output_dir DIR` (a small Llama learns addition) or
    /// `runtime example reverse --output_dir DIR` (a small T5 learns to reverse digit strings).
    Example {
        /// The example to write: addition or reverse
        name: String,
        #[arg(long = "output_dir")]
        output_dir: PathBuf,
        #[arg(long = "n_train", default_value_t = 20000)]
        n_train: usize,
        #[arg(long = "n_eval", default_value_t = 500)]
        n_eval: usize,
        /// addition: digits per operand (default 3); reverse: the longest digit string (default 8)
        #[arg(long)]
        digits: Option<u32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Write into a non-empty folder (the example's files replace files of the same names).
        #[arg(long = "overwrite_output_dir")]
        overwrite_output_dir: bool,
    },
    /// Search hyperparameters as `Trainer.hyperparameter_search` does: `runtime hp-search --config
    /// run.toml --space space.toml --n_trials N`; each trial trains in `output_dir/run-N`.
    #[command(name = "hp-search")]
    HpSearch(jobs::HpSearchArgs),
    /// Evaluate a model or checkpoint (`model_name_or_path`) on `validation_file`.
    Eval {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
    },
    /// Generate for every example of a test set (prompt/completion or messages records) and write
    /// `generated_predictions.jsonl` and `predict_results.json` (with the metrics plugins'
    /// results) to `--output_dir`: `runtime predict --model DIR --test_file F [--plugin M.wasm]`.
    Predict {
        #[arg(long)]
        model: PathBuf,
        #[arg(long = "test_file")]
        test_file: PathBuf,
        /// A PEFT LoRA adapter folder on the model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// TrainingArguments (`--output_dir`, `--per_device_eval_batch_size`,
        /// `--generation_max_length`, `--generation_num_beams`, `--plugin F.wasm`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
    },
    /// Generate text greedily with the KV cache, streaming the tokens: `runtime generate --model DIR
    /// --prompt TEXT`.
    Generate {
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter folder on the model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// A prompt (repeatable: a left-padded batch; the first one is streamed).
        #[arg(long)]
        prompt: Vec<String>,
        /// A file of prompts, one per line.
        #[arg(long = "prompt_file")]
        prompt_file: Option<PathBuf>,
        /// Wrap each prompt as a user turn of the tokenizer's chat template.
        #[arg(long)]
        chat: bool,
        /// cpu, cuda or auto
        #[arg(long, default_value = "auto")]
        device: String,
        /// GenerationConfig settings under transformers' names, overriding the model's
        /// generation_config.json: `--max_new_tokens 32 --do_sample --temperature 0.7 --top_p 0.9 --seed 1`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        settings: Vec<String>,
    },
    /// Inspect or check a WebAssembly plugin (`runtime plugin inspect FILE.wasm`).
    Plugin {
        #[command(subcommand)]
        action: PluginAction,
    },
    /// Resolve the run's TrainingArguments (config file, then --name value overrides, validated)
    /// and print them as training_args.json would hold them.
    Args {
        /// A TOML, JSON or YAML file of TrainingArguments.
        #[arg(long)]
        config: Option<PathBuf>,
        /// `--name value` settings that override the file (HF names).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
    },
    /// Train a few steps on random tokens and report tokens/s, peak memory and where the time goes.
    Bench(bench::BenchArgs),
    /// Compile every CUDA kernel with NVRTC for the given architectures (no GPU needed): the
    /// check the test suite runs.
    Kernels {
        /// e.g. sm_90 (repeatable; default sm_90 and sm_80)
        #[arg(long)]
        arch: Vec<String>,
        /// fill the kernel cache for these architectures instead (what `--device cuda` compiles
        /// at its first start), rebuilding damaged entries; says which files were cached already
        #[arg(long)]
        cache: bool,
        #[arg(long)]
        json: bool,
    },
    /// On a machine with an NVIDIA GPU: every op of the CUDA backend against the CPU backend on
    /// random inputs, then whole training steps; a table, and a non-zero exit on any mismatch.
    CudaCheck {
        /// bf16 mixed precision (limits 1e-2 where bf16 operands are involved)
        #[arg(long)]
        bf16: bool,
        #[arg(long)]
        json: bool,
        /// also time the attention kernels and the fused AdamW step
        #[arg(long)]
        bench: bool,
        /// no GPU: run the bf16 checks on the CPU model of the bf16 mode (its rounding on the CPU
        /// backend), with the holds `RUNTIME_CUDA_HOLDS` sets
        #[arg(long, conflicts_with = "bench")]
        model: bool,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { config, output_dir, seed, torch_dtype, max_shard_size, overwrite_output_dir } => {
            let dtype = torch_dtype.as_deref().map(parse_dtype).transpose()?;
            let n = commands::init(&config, &output_dir, seed, dtype, parse_shard_size(&max_shard_size)?, overwrite_output_dir)?;
            println!("wrote {} ({n} parameters, seed {seed})", output_dir.display());
        }
        Command::Inspect { dir, device } => print!("{}", commands::inspect(&dir, parse_device(&device)?)?),
        Command::Merge { model, adapter, output_dir, torch_dtype, max_shard_size, overwrite_output_dir } => {
            let dtype = torch_dtype.as_deref().map(parse_dtype).transpose()?;
            commands::merge(&model, &adapter, &output_dir, dtype, parse_shard_size(&max_shard_size)?, overwrite_output_dir)?;
            println!("wrote {}", output_dir.display());
        }
        Command::Convert { model, output_dir, torch_dtype, max_shard_size, overwrite_output_dir } => {
            let dtype = torch_dtype.as_deref().map(parse_dtype).transpose()?;
            commands::convert(&model, &output_dir, dtype, parse_shard_size(&max_shard_size)?, overwrite_output_dir)?;
            println!("wrote {}", output_dir.display());
        }
        Command::Forward { model, inputs, output, adapter, attn_implementation, torch_dtype, device } => {
            let opts = LoadOptions {
                torch_dtype: torch_dtype.as_deref().map(parse_dtype).transpose()?,
                attn_implementation: parse_attn(&attn_implementation)?,
                device: parse_device(&device)?,
            };
            match commands::forward(&model, adapter.as_deref(), &inputs, &output, opts)? {
                Some(loss) => println!("loss {loss:.6}; logits written to {}", output.display()),
                None => println!("logits written to {}", output.display()),
            }
        }
        Command::Tokenize { model, mut text, file, no_special_tokens, padding, max_length, truncation, pad_to_multiple_of, padding_side } => {
            if let Some(f) = &file {
                let body = runtime::files::read_text(f)?;
                text.extend(body.lines().map(str::to_string));
            }
            if text.is_empty() {
                anyhow::bail!("give --text TEXT (repeatable) or --file FILE");
            }
            let pad = match padding.as_deref() {
                None => None,
                Some(p) => {
                    let padding =
                        runtime::data::Padding::parse(p).ok_or_else(|| anyhow::anyhow!("--padding `{p}`: expected longest, max_length or do_not_pad"))?;
                    let side = match padding_side.as_deref() {
                        None => runtime::data::Tokenizer::from_dir(&model)?.padding_side,
                        Some(s) => runtime::data::Side::parse(s).ok_or_else(|| anyhow::anyhow!("--padding_side `{s}`: expected left or right"))?,
                    };
                    Some(runtime::data::PadOptions { padding, side, pad_id: 0, max_length, truncation, pad_to_multiple_of })
                }
            };
            print!("{}", commands::tokenize(&model, &text, !no_special_tokens, pad)?);
        }
        Command::Train { config, overrides } => {
            let overrides = runtime::args::training::parse_overrides(&overrides)?;
            let args = runtime::args::TrainingArguments::load(config.as_deref(), &overrides)?;
            jobs::train(args)?;
        }
        Command::Example { name, output_dir, n_train, n_eval, digits, seed, overwrite_output_dir } => {
            match name.as_str() {
                "addition" => runtime::example::addition(&output_dir, n_train, n_eval, digits.unwrap_or(3), seed, overwrite_output_dir)?,
                "reverse" => runtime::example::reverse(&output_dir, n_train, n_eval, digits.unwrap_or(8), seed, overwrite_output_dir)?,
                _ => anyhow::bail!("unknown example `{name}` (available: addition, reverse)"),
            }
            println!("wrote {}; train with: runtime train --config {}", output_dir.display(), output_dir.join("train.toml").display());
        }
        Command::HpSearch(a) => jobs::hp_search(&a.options()?)?,
        Command::Eval { config, overrides } => {
            let overrides = adapter_alias(runtime::args::training::parse_overrides(&overrides)?);
            let args = runtime::args::TrainingArguments::load(config.as_deref(), &overrides)?;
            jobs::eval(args)?;
        }
        Command::Predict { model, test_file, adapter, overrides } => {
            let mut overrides = adapter_alias(runtime::args::training::parse_overrides(&overrides)?);
            if let Some(a) = adapter {
                overrides.push(("adapter_name_or_path".into(), serde_json::json!(a)));
            }
            overrides.insert(0, ("model_name_or_path".into(), serde_json::json!(model)));
            overrides.insert(1, ("validation_file".into(), serde_json::json!(test_file)));
            overrides.push(("predict_with_generate".into(), serde_json::json!(true)));
            let args = runtime::args::TrainingArguments::load(None, &overrides)?;
            jobs::predict(args)?;
        }
        Command::Generate { model, adapter, mut prompt, prompt_file, chat, device, settings } => {
            if let Some(f) = &prompt_file {
                let body = runtime::files::read_text(f)?;
                prompt.extend(body.lines().filter(|l| !l.is_empty()).map(str::to_string));
            }
            if prompt.is_empty() {
                anyhow::bail!("give --prompt TEXT (repeatable) or --prompt_file FILE");
            }
            let mut overrides = runtime::args::training::parse_overrides(&settings)?;
            // `--device` may come after the generation settings, which collect what follows them
            let mut device = device;
            if let Some(i) = overrides.iter().position(|(k, _)| k == "device") {
                let (_, v) = overrides.remove(i);
                device = v.as_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("--device: expected cpu, cuda or auto"))?;
            }
            // `--adapter DIR`: a PEFT LoRA adapter on the model
            let adapter = match overrides.iter().position(|(k, _)| k == "adapter") {
                Some(i) => Some(PathBuf::from(overrides.remove(i).1.as_str().ok_or_else(|| anyhow::anyhow!("--adapter: expected a folder"))?)),
                None => adapter,
            };
            commands::generate(&model, adapter.as_deref(), &prompt, chat, &overrides, parse_device(&device)?, &mut std::io::stdout())?;
        }
        Command::Plugin { action } => match action {
            PluginAction::Inspect { file } => print!("{}", runtime::tools::plugin_check::inspect(&runtime::plugin::PluginSpec::new(file))?),
            PluginAction::Check { file, options, tokenizer } => {
                let mut spec = runtime::plugin::PluginSpec::new(file);
                for o in options {
                    let (k, v) = o.split_once('=').ok_or_else(|| anyhow::anyhow!("--option `{o}`: expected key=value"))?;
                    spec.options.insert(k.to_string(), v.to_string());
                }
                let tok = tokenizer
                    .map(|d| runtime::data::Tokenizer::from_dir(&d).map(|t| std::sync::Arc::new(t) as std::sync::Arc<dyn runtime::protocol::TokenDecoder>))
                    .transpose()?;
                print!("{}", runtime::tools::plugin_check::check(&spec, tok)?);
            }
            PluginAction::Bench { loss, metrics, callbacks, steps } => {
                anyhow::ensure!(
                    loss.is_some() || metrics.is_some() || callbacks.is_some(),
                    "give a plugin to measure: --loss, --metrics or --callbacks FILE.wasm"
                );
                // one warm-up step comes before them
                anyhow::ensure!((1..usize::MAX).contains(&steps), "--steps must be at least 1 (and below {})", usize::MAX);
                let model = bench::BenchConfig {
                    arch: "llama".into(),
                    n_layer: 6,
                    hidden: 384,
                    n_head: 6,
                    n_kv_head: 6,
                    intermediate: None,
                    vocab: 8192,
                    seq: 256,
                    batch: 8,
                    steps,
                    warmup: 1,
                    attn: runtime::backend::AttnImpl::Flash,
                    gradient_checkpointing: false,
                    loss_chunk_rows: None,
                    lora_r: None,
                    torch_dtype: None,
                    shard: 0,
                };
                print!("{}", runtime::tools::plugin_bench::run(&runtime::tools::plugin_bench::PluginBenchArgs { loss, metrics, callbacks, model })?);
            }
        },
        Command::Args { config, overrides } => {
            let overrides = runtime::args::training::parse_overrides(&overrides)?;
            let args = runtime::args::TrainingArguments::load(config.as_deref(), &overrides)?;
            println!("{}", args.to_json());
        }
        Command::Bench(a) => a.run()?,
        Command::Kernels { mut arch, cache, json } => {
            if arch.is_empty() {
                arch = vec!["sm_90".into(), "sm_80".into()];
            }
            runtime::tools::gpu::kernels(&arch, cache, json)?;
        }
        Command::CudaCheck { model: true, json, .. } => runtime::tools::gpu::model_check(json)?,
        Command::CudaCheck { bf16, json, bench, model: false } => runtime::tools::gpu::cuda_check(bf16, json, bench)?,
    }
    Ok(())
}

/// A command that prints (`inspect`, `generate`, `bench`, `cuda-check`, ...) ends as `cat` does
/// when the reader of its output leaves (`runtime inspect DIR | head`): at once and silently, by
/// SIGPIPE, instead of Rust's panic at the next print. The training jobs (`train`, `hp-search`)
/// keep the signal ignored: their product is files, and their prints drop what a closed stdout
/// cannot take; so do the processes of a data parallel run, whose links to each other are sockets.
fn end_quietly_when_stdout_closes() {
    #[cfg(unix)]
    // SAFETY: called once at start, before any thread exists; SIG_DFL is a valid disposition
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    // logs to stderr; RUST_LOG (e.g. `RUST_LOG=debug`) sets the level, `info` by default (`warn`
    // on the processes of a data parallel run other than rank 0)
    let default_level = if runtime::engine::mpi::launcher_rank().unwrap_or(0) > 0 { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)))
        .init();
    // every failure, a device's (out of memory, above all) included, comes back as a value:
    // one error line and exit status 1
    let cli = Cli::parse();
    let several = runtime::engine::mpi::launcher_world_size().unwrap_or(1) > 1;
    if !several && !matches!(cli.command, Command::Train { .. } | Command::HpSearch(_)) {
        end_quietly_when_stdout_closes();
    }
    let result = match cli.command {
        Command::Train { .. } => run(cli),
        Command::Bench(ref a) if a.decode.is_none() && a.roofline.is_none() => run(cli),
        _ if several => Err(anyhow::anyhow!(
            "only `runtime train` and the training `runtime bench` run across several processes; start this command without the MPI launcher"
        )),
        _ => run(cli),
    };
    match result {
        Ok(()) => {
            runtime::engine::mpi::finish();
            ExitCode::SUCCESS
        }
        Err(e) => match e.downcast_ref::<runtime::error::Error>() {
            Some(runtime::error::Error::Interrupted(msg)) => {
                // every process of a data parallel run stops after the same step
                eprintln!("stopped: {msg}");
                runtime::engine::mpi::finish();
                ExitCode::from(STOPPED_RESUMABLE)
            }
            Some(runtime::error::Error::Agreed(msg)) => {
                // every process of the run failed alike: each ends MPI normally
                eprintln!("error: {msg}");
                runtime::engine::mpi::finish();
                ExitCode::FAILURE
            }
            _ => {
                // one write, so that the line survives the other processes' abort
                // one line, whatever a library's message looks like
                let msg = e.to_string();
                let line = msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
                let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("error: {line}\n").as_bytes());
                if several {
                    // the launcher tears the job down at the abort, and the line may still be in
                    // the pipe it forwards (seen with MPICH's Hydra when every process failed at
                    // once): give it time to pass the line on
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                // no process of a data parallel run is left waiting for this one
                runtime::engine::mpi::abort_all(1);
                ExitCode::FAILURE
            }
        },
    }
}

/// `--adapter DIR` on `eval` and `predict`: the run setting `adapter_name_or_path`.
fn adapter_alias(overrides: Vec<(String, serde_json::Value)>) -> Vec<(String, serde_json::Value)> {
    overrides.into_iter().map(|(k, v)| (if k == "adapter" { "adapter_name_or_path".into() } else { k }, v)).collect()
}

/// The exit status of a training run stopped by SIGTERM or SIGINT after writing a checkpoint to
/// resume from: 75, `EX_TEMPFAIL` ("a temporary failure; retry later").
const STOPPED_RESUMABLE: u8 = 75;
