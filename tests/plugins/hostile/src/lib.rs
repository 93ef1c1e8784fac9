//! A plugin that misbehaves in `compute_loss` in the way its option `mode` names. The sandbox
//! tests check that each ends in a clear error and leaves the host unharmed.

use runtime_plugin::{export, host, Loss, LossOutput, Metric, Metrics, Plugin, Statistics, TokenBatch};

#[derive(Default)]
struct Hostile;

impl Plugin for Hostile {
    const NAME: &'static str = "hostile";
    const VERSION: &'static str = "0.1.0";
}

fn ok(loss: f32, d: Vec<f32>) -> Result<LossOutput, String> {
    Ok(LossOutput { loss, d_label_logprob: d, d_logsumexp: vec![], d_mean_logprob: vec![], d_entropy: vec![] })
}

impl Loss for Hostile {
    fn statistics(&mut self) -> Statistics {
        Statistics::LABEL_LOGPROB
    }

    fn compute_loss(&mut self, batch: TokenBatch) -> Result<LossOutput, String> {
        let n = batch.labels.len();
        match host::option("mode").as_deref().unwrap_or("") {
            "spin" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "grow" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 16 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "trap" => panic!("this plugin always panics"),
            "huge" => ok(0.0, vec![0.5f32; 1 << 28]),
            "bad-grad-len" => ok(0.0, vec![0.0; n + 1]),
            "nan-loss" => ok(f32::NAN, vec![0.0; n]),
            "read-file" => match std::fs::read_to_string("/etc/passwd") {
                Ok(s) => Err(format!("SANDBOX BREACH: read {} bytes: {}", s.len(), &s[..s.len().min(40)])),
                Err(e) => Err(format!("reading /etc/passwd failed: {e}")),
            },
            "socket" => match std::net::TcpStream::connect("127.0.0.1:22") {
                Ok(_) => Err("SANDBOX BREACH: connected to 127.0.0.1:22".into()),
                Err(e) => Err(format!("connecting to 127.0.0.1:22 failed: {e}")),
            },
            "env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                let args: Vec<String> = std::env::args().collect();
                Err(format!("sees {} environment variables {vars:?} and {} arguments", vars.len(), args.len()))
            }
            "print" => {
                println!("hello from the plugin's stdout");
                eprintln!("and from its stderr");
                ok(1.0, vec![0.0; n])
            }
            other => Err(format!("unknown mode `{other}`")),
        }
    }
}

impl Metrics for Hostile {
    fn compute(&mut self) -> Result<Vec<Metric>, String> {
        Ok(vec![Metric { name: "bad".into(), value: f64::INFINITY }])
    }
}

export!(Hostile: Loss, Metrics);
