//! TensorBoard event files: scalars (loss, learning rates, epoch metrics) that TensorBoard, or any
//! reader of the tfevents format, plots.
//!
//! The format is TensorFlow's record file: each record is
//! `u64 length | u32 masked CRC-32C of the length | data | u32 masked CRC-32C of the data`
//! (little-endian; masked = `((crc >> 15) | (crc << 17)) + 0xa282ead8`), and each record's data an
//! `Event` protocol buffer. The first event carries `file_version = "brain.Event:2"`; every other
//! one a step, a wall time and a `Summary` of scalar values. Only the fields thaw writes are
//! declared here (their field numbers are TensorFlow's `event.proto` and `summary.proto`).
//! `tests/observe.rs` reads the files back with Python's `tensorboard` package.
//!
//! Writing never fails a run: an error is logged once and the writer stops.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One record of the tfevents format around `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// An open event file; scalars are buffered and flushed every `FLUSH_EVERY` events and on drop.
pub struct EventWriter {
    path: PathBuf,
    out: Option<std::io::BufWriter<std::fs::File>>,
    pending: usize,
}

const FLUSH_EVERY: usize = 64;

impl EventWriter {
    /// Creates `dir` and a new event file in it (`events.out.tfevents.<unix seconds>.<host>`).
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "thaw".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}", now.as_secs(), std::process::id()));
        let file = std::fs::File::create(&path)?;
        let mut w = EventWriter { path, out: Some(std::io::BufWriter::new(file)), pending: 0 };
        w.write(&Event {
            wall_time: now.as_secs_f64(),
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        });
        w.flush();
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars `(tag, value)` at `step`, in one event.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        let wall_time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let value = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue { tag: tag.to_string(), simple_value: Some(*v as f32) })
            .collect();
        self.write(&Event { wall_time, step: step as i64, file_version: None, summary: Some(Summary { value }) });
        self.pending += 1;
        if self.pending >= FLUSH_EVERY {
            self.flush();
        }
    }

    fn write(&mut self, event: &Event) {
        let Some(out) = &mut self.out else { return };
        if let Err(e) = out.write_all(&record(&event.encode_to_vec())) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write TensorBoard events; stopping them");
            self.out = None;
        }
    }

    pub fn flush(&mut self) {
        self.pending = 0;
        if let Some(out) = &mut self.out {
            if let Err(e) = out.flush() {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot write TensorBoard events; stopping them");
                self.out = None;
            }
        }
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Every scalar series of the event files in `dir` (as written here, or by anything that writes
/// `simple_value` scalars): tag -> [(step, value)], in file then record order. A damaged record
/// (length or data CRC) is an error naming the file and the offset.
pub fn read_scalars(dir: &Path) -> std::io::Result<std::collections::BTreeMap<String, Vec<(u64, f64)>>> {
    let bad = |path: &Path, at: usize, what: &str| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what} at byte {at}", path.display()))
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("events.out.tfevents.")))
        .collect();
    files.sort();
    let mut out: std::collections::BTreeMap<String, Vec<(u64, f64)>> = Default::default();
    for path in files {
        let bytes = std::fs::read(&path)?;
        let mut at = 0;
        while at < bytes.len() {
            if bytes.len() - at < 12 {
                return Err(bad(&path, at, "a truncated record header"));
            }
            let len_bytes = &bytes[at..at + 8];
            if u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap_or_default()) != masked_crc(len_bytes) {
                return Err(bad(&path, at, "a record length whose CRC does not match"));
            }
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or_default()) as usize;
            let end = at.checked_add(16).and_then(|x| x.checked_add(len)).filter(|&e| e <= bytes.len());
            let Some(end) = end else { return Err(bad(&path, at, "a truncated record")) };
            let data = &bytes[at + 12..end - 4];
            if u32::from_le_bytes(bytes[end - 4..end].try_into().unwrap_or_default()) != masked_crc(data) {
                return Err(bad(&path, at, "a record whose CRC does not match"));
            }
            let event = Event::decode(data).map_err(|e| bad(&path, at, &format!("an undecodable event ({e})")))?;
            for v in event.summary.map(|s| s.value).unwrap_or_default() {
                if let Some(x) = v.simple_value {
                    out.entry(v.tag).or_default().push((event.step.max(0) as u64, x as f64));
                }
            }
            at = end;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_with_masked_crc32c() {
        // CRC-32C of "123456789" is 0xe3069283 (the standard check value); masked as TensorFlow does.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(u64::from_le_bytes(r[..8].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(r[8..12].try_into().unwrap()), masked_crc(&3u64.to_le_bytes()));
        assert_eq!(&r[12..15], b"abc");
        let m = masked_crc(b"abc");
        let crc = m.wrapping_sub(0xa282_ead8).rotate_left(15);
        assert_eq!(crc, crc32c::crc32c(b"abc"), "unmasking gives the CRC back");
    }

    #[test]
    fn a_file_holds_the_version_then_the_scalars() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let mut w = EventWriter::create(dir.path()).unwrap();
            w.scalars(7, &[("loss", 0.5), ("lr/head", 0.01), ("nan", f64::NAN)]);
            w.path().to_path_buf()
        };
        let bytes = std::fs::read(path).unwrap();
        let mut events = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(data));
            events.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let values = &events[1].summary.as_ref().unwrap().value;
        assert_eq!(events[1].step, 7);
        assert_eq!(values.len(), 2, "non-finite values are left out");
        assert_eq!((values[1].tag.as_str(), values[1].simple_value), ("lr/head", Some(0.01)));
        let read = read_scalars(dir.path()).unwrap();
        assert_eq!(read["loss"], [(7, 0.5)]);
        // A flipped byte is found and named.
        let file = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        let err = read_scalars(dir.path()).unwrap_err().to_string();
        assert!(err.contains("CRC does not match") && err.contains("events.out.tfevents."), "{err}");
    }
}
