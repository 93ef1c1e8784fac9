//! Left padding with position ids, the way ChatGLM's tokenizer overrides `_pad`: every row ends
//! at the right edge, padding on the left, and each row's positions count its own tokens from 0
//! so a left-padded row is computed exactly like an unpadded one.

use runtime_plugin::{export, pad_default, Example, PadOptions, Padded, Padding, Plugin, Side};

#[derive(Default)]
struct LeftPad;

impl Plugin for LeftPad {
    const NAME: &'static str = "left-pad";
    const VERSION: &'static str = "0.1.0";
}

impl Padding for LeftPad {
    fn pad(&mut self, examples: Vec<Example>, options: PadOptions) -> Result<Padded, String> {
        pad_default(&examples, &PadOptions { side: Side::Left, ..options }, true)
    }
}

export!(LeftPad: Padding);
