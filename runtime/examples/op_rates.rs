//! Per-op timings of the CPU backend at the benchmark's shapes (GPT-2, 6 x 384, batch 8 x 256):
//! `cargo run --release --example op_rates`. Used to find the ops worth optimising.

use runtime::backend::cpu::Cpu;
use runtime::backend::{AttnImpl, AttnShape, Backend};
use runtime::bench::best_seconds;

fn main() {
    let be = Cpu;
    let rows = 2048;
    let x: Vec<f32> = (0..rows * 1536).map(|i| ((i % 97) as f32 - 48.0) * 0.05).collect();
    let mut y = vec![0.0f32; x.len()];
    let n = x.len() as f64;
    println!("gelu fwd      {:.2} ns/elem", best_seconds(7, || be.gelu_fwd(&mut y, &x)) / n * 1e9);
    let d = x.clone();
    println!("gelu bwd      {:.2} ns/elem", best_seconds(7, || be.gelu_bwd(&mut y, &x, &d)) / n * 1e9);
    let s = AttnShape { batch: 8, seq: 256, n_head: 6, n_kv_head: 6, head_dim: 64 };
    let qkv: Vec<f32> = (0..rows * s.qkv_width()).map(|i| ((i % 89) as f32 - 44.0) * 0.01).collect();
    let mask = vec![1i32; rows];
    for imp in [AttnImpl::Eager, AttnImpl::Flash] {
        let mut out = vec![0.0f32; rows * s.out_width()];
        let mut stats = vec![0.0f32; s.stats_len(imp)];
        let mut dqkv = vec![0.0f32; qkv.len()];
        let dout = out.clone();
        let tf = best_seconds(7, || be.attention_fwd(&mut out, &mut stats, &qkv, &mask, s, imp));
        let tb = best_seconds(7, || be.attention_bwd(&mut dqkv, &dout, &qkv, &out, &stats, &mask, s, imp));
        println!("attention {imp:?}: fwd {:.1} ms, bwd {:.1} ms (per layer)", tf * 1e3, tb * 1e3);
    }
    let mut logits: Vec<f32> = (0..rows * 8192).map(|i| ((i % 101) as f32) * 0.01).collect();
    let targets: Vec<i32> = (0..rows as i32).map(|i| i % 8192).collect();
    println!(
        "cross entropy {:.1} ms",
        best_seconds(7, || {
            be.cross_entropy(&mut logits, &targets, 8192, 0.0, Some(1e-3)).unwrap();
        }) * 1e3
    );
}
