//! TensorBoard's event files, written as `torch.utils.tensorboard.SummaryWriter` writes them:
//! TFRecord framing (a little-endian u64 length, the masked CRC-32C of those 8 bytes, the data,
//! the masked CRC-32C of the data) around `Event` protobufs (`tensorflow/core/util/event.proto`,
//! `summary.proto`, `tensor.proto`; only the fields written here are declared). The first
//! record is the `file_version` event; scalars are `simple_value`s, text is a string tensor for
//! the `text` plugin. A reader that checks every CRC is here too, for tests and tools.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{Error, Result};

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

/// `Event.what`: the file's version record, or a summary.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    #[prost(oneof = "ValueKind", tags = "2, 8")]
    pub value: Option<ValueKind>,
}

/// `Summary.Value.value`: a scalar, or a tensor.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// `tensorflow.SummaryMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `tensorflow.TensorProto` (strings only).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

/// `tensorflow.TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// `tensorflow.DataType.DT_STRING`.
pub const DT_STRING: i32 = 7;

/// The version string of the first record.
pub const FILE_VERSION: &str = "brain.Event:2";

/// TFRecord's masked CRC-32C: the checksum rotated right by 15 bits plus a constant.
pub fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, the data's masked CRC.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The records of a TFRecord file, every length and data CRC checked; an error names the file,
/// the record and its byte offset.
pub fn read_records(path: &Path) -> Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |at: usize, n: usize, what: &str| Error::config(path, format!("record {n} at byte {at}: {what}"));
    let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let (mut at, mut records) = (0usize, Vec::new());
    while at < bytes.len() {
        let n = records.len();
        if bytes.len() - at < 12 {
            return Err(bad(at, n, "truncated header"));
        }
        let len_bytes = &bytes[at..at + 8];
        if u32_at(at + 8) != masked_crc(len_bytes) {
            return Err(bad(at, n, "length CRC mismatch"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let start = at + 12;
        let end = usize::try_from(len).ok().and_then(|l| start.checked_add(l)).filter(|&e| e.checked_add(4).is_some_and(|t| t <= bytes.len()));
        let Some(end) = end else { return Err(bad(at, n, "truncated data")) };
        if u32_at(end) != masked_crc(&bytes[start..end]) {
            return Err(bad(at, n, "data CRC mismatch"));
        }
        records.push(bytes[start..end].to_vec());
        at = end + 4;
    }
    Ok(records)
}

/// The events of an event file, decoded.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    read_records(path)?
        .iter()
        .enumerate()
        .map(|(i, r)| Event::decode(r.as_slice()).map_err(|e| Error::config(path, format!("record {i}: not an Event: {e}"))))
        .collect()
}

/// The seconds since the epoch, as `time.time()` gives them.
pub fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// An open event file: `events.out.tfevents.<seconds>.<host>.<pid>.<n>` in its folder, as
/// TensorBoard's `EventFileWriter` names them (TensorBoard reads every file with `tfevents` in
/// its name).
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates the folder and the file, and writes the `file_version` record.
    pub fn create(dir: &Path) -> Result<Self> {
        static UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let wall = now();
        let host = gethostname::gethostname().to_string_lossy().to_string();
        let uid = UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("events.out.tfevents.{:010}.{host}.{}.{uid}", wall as u64, std::process::id()));
        let file = File::options().create_new(true).write(true).open(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { path, out: BufWriter::new(file) };
        w.write(&Event { wall_time: wall, step: 0, what: Some(What::FileVersion(FILE_VERSION.into())) })?;
        w.flush()?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event (buffered until [`EventWriter::flush`]).
    pub fn write(&mut self, event: &Event) -> Result<()> {
        self.out.write_all(&frame(&event.encode_to_vec())).map_err(|e| Error::io(&self.path, e))
    }

    /// `SummaryWriter.add_scalar`: a `simple_value` at `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        let v = SummaryValue { tag: tag.into(), metadata: None, value: Some(ValueKind::SimpleValue(value)) };
        self.write(&summary_event(v, step))
    }

    /// `SummaryWriter.add_text`: a one-string tensor tagged `<tag>/text_summary` for the text
    /// plugin.
    pub fn add_text(&mut self, tag: &str, text: &str, step: i64) -> Result<()> {
        let tensor =
            TensorProto { dtype: DT_STRING, tensor_shape: Some(TensorShape { dim: vec![Dim { size: 1 }] }), string_val: vec![text.as_bytes().to_vec()] };
        let metadata = SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "text".into(), content: Vec::new() }) };
        let v = SummaryValue { tag: format!("{tag}/text_summary"), metadata: Some(metadata), value: Some(ValueKind::Tensor(tensor)) };
        self.write(&summary_event(v, step))
    }

    /// Hands what is buffered to the operating system, so a running TensorBoard sees it.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }
}

fn summary_event(value: SummaryValue, step: i64) -> Event {
    Event { wall_time: now(), step, what: Some(What::Summary(Summary { value: vec![value] })) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::manual_rotate)] // the mask as TFRecord's specification writes it
    fn crc32c_and_its_mask_match_the_published_values() {
        // CRC-32C check value (RFC 3720, B.4): "123456789" -> 0xE3069283
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let c: u32 = 0xE306_9283;
        assert_eq!(masked_crc(b"123456789"), ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn a_flipped_byte_is_caught_by_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.add_scalar("train/loss", 1.5, 3).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].step, 3);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_records(&path).unwrap_err().to_string();
        assert!(err.contains("record 1") && err.contains("CRC"), "{err}");
    }
}
