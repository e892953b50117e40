//! Live training curves for TensorBoard (`report_to = ["tensorboard"]`, as
//! in TRL): every number of a step's metrics as a scalar under `train/`,
//! written to `output_dir/runs/` while the run goes. Hand-written because
//! the format is small and the Rust crates for it are unmaintained: an
//! event file is TFRecords (length, masked CRC-32C of the length, the
//! bytes, their masked CRC-32C) of `Event` protocol buffers, of which
//! three fields are used here: `wall_time`, `step`, and a `Summary` of
//! `(tag, simple_value)` pairs (or the file version, or a session start).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::metrics::StepMetrics;
use crate::{Result, TrainError};

/// An open event file under a run's `runs/` directory.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), named as TensorBoard
    /// names them so that its reader finds it. A run resumed at `step`
    /// marks a session start there, so that TensorBoard drops the points a
    /// killed run wrote past its last checkpoint from the older files.
    pub fn create(dir: &Path, resumed_at: Option<usize>) -> Result<Self> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |cause| TrainError::Io { path, cause }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let now = wall_time();
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "r3".into());
        // A new file every time, never one already there: the counter
        // tells apart writers opened in the same second by one process.
        let (mut n, host) = (0u32, host.trim().to_string());
        let (file, path) = loop {
            let name = format!(
                "events.out.tfevents.{}.{host}.{}.{n}",
                now as u64,
                std::process::id()
            );
            let path = dir.join(name);
            match File::create_new(&path) {
                Ok(file) => break (file, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(io(&path)(e)),
            }
        };
        let mut writer = Self { file, path };
        let mut version = Vec::new();
        put_double(&mut version, 1, now);
        put_bytes(&mut version, 3, b"brain.Event:2");
        writer.write_record(&version)?;
        if let Some(step) = resumed_at {
            let mut start = Vec::new();
            put_double(&mut start, 1, now);
            put_varint_field(&mut start, 2, step as u64);
            let mut session_log = Vec::new();
            put_varint_field(&mut session_log, 1, 1); // status: START
            put_bytes(&mut start, 6, &session_log);
            writer.write_record(&start)?;
        }
        Ok(writer)
    }

    /// Writes `scalars` as one event at `step`, flushed so that TensorBoard
    /// shows it at once.
    pub fn scalars(&mut self, step: usize, scalars: &[(String, f32)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut entry = Vec::new();
            put_bytes(&mut entry, 1, tag.as_bytes());
            entry.push(2 << 3 | 5); // field 2, 32-bit: simple_value
            entry.extend(value.to_le_bytes());
            put_bytes(&mut summary, 1, &entry);
        }
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Every number of a step's metrics, under `train/<name>`.
    pub fn step(&mut self, m: &StepMetrics) -> Result<()> {
        let fields = serde_json::to_value(m).expect("serialisable");
        let scalars: Vec<(String, f32)> = fields
            .as_object()
            .expect("a struct")
            .iter()
            .filter(|(name, _)| *name != "step")
            .filter_map(|(name, v)| Some((format!("train/{name}"), v.as_f64()? as f32)))
            .collect();
        self.scalars(m.step, &scalars)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let length = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend(length);
        record.extend(masked_crc(&length).to_le_bytes());
        record.extend(data);
        record.extend(masked_crc(data).to_le_bytes());
        self.file
            .write_all(&record)
            .and_then(|_| self.file.flush())
            .map_err(|cause| TrainError::Io {
                path: self.path.display().to_string(),
                cause,
            })
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// TFRecord's checksum: CRC-32C, rotated and offset.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, v: u64) {
    put_varint(out, field << 3);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u64, v: f64) {
    put_varint(out, field << 3 | 1);
    out.extend(v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend(bytes);
}
