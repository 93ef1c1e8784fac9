//! A padding plugin whose batch is wrong in the way its option `mode` names (`rows`, `ragged`,
//! `mask`, `id`, `label`, `long`, `position`); without a mode it pads as the tokenizer does. The
//! tests check that each wrong batch ends the run with one clear error and writes nothing.

use runtime_plugin::{export, host, pad_default, Example, PadOptions, Padded, Padding, Plugin};

#[derive(Default)]
struct BadPad;

impl Plugin for BadPad {
    const NAME: &'static str = "bad-pad";
    const VERSION: &'static str = "0.1.0";
}

impl Padding for BadPad {
    fn pad(&mut self, examples: Vec<Example>, options: PadOptions) -> Result<Padded, String> {
        let mut p = pad_default(&examples, &options, false)?;
        let (b, t) = (p.batch_size as usize, p.seq_len as usize);
        match host::option("mode").as_deref().unwrap_or("") {
            "" => {}
            "rows" => {
                p.batch_size -= 1;
                p.input_ids.truncate((b - 1) * t);
                p.attention_mask.truncate((b - 1) * t);
                p.labels.truncate((b - 1) * t);
            }
            "ragged" => {
                p.input_ids.pop();
            }
            "mask" => p.attention_mask[0] = 2,
            "id" => p.input_ids[0] = 1 << 30,
            "label" => p.labels[0] = -7,
            "long" => {
                let t = 1 << 20;
                p.seq_len = t as u32;
                p.input_ids = vec![0; b * t];
                p.attention_mask = vec![1; b * t];
                p.labels = vec![-100; b * t];
            }
            "position" => p.position_ids = Some((0..(b * t) as u32).map(|i| if i == 0 { 1 << 30 } else { 0 }).collect()),
            other => return Err(format!("unknown mode `{other}`")),
        }
        Ok(p)
    }
}

export!(BadPad: Padding);
