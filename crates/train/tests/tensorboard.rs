//! TensorBoard event files read back as TensorBoard reads them: TFRecord
//! framing with its masked CRC-32C checked, then the `Event` protocol
//! buffers decoded field by field.

use r3_train::metrics::StepMetrics;
use r3_train::tensorboard::{masked_crc, EventWriter};

/// One decoded event: (wall_time, step, [(tag, value)], session start).
type Event = (f64, u64, Vec<(String, f32)>, bool);

fn varint(bytes: &[u8], at: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let b = bytes[*at];
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// The fields of a protocol buffer message: (number, wire type, bytes).
fn fields(bytes: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        let key = varint(bytes, &mut at);
        let (field, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => varint(bytes, &mut at).to_le_bytes().to_vec(),
            1 => {
                at += 8;
                bytes[at - 8..at].to_vec()
            }
            2 => {
                let n = varint(bytes, &mut at) as usize;
                at += n;
                bytes[at - n..at].to_vec()
            }
            5 => {
                at += 4;
                bytes[at - 4..at].to_vec()
            }
            other => panic!("wire type {other}"),
        };
        out.push((field, wire, value));
    }
    out
}

fn read_events(path: &std::path::Path) -> Vec<Event> {
    let data = std::fs::read(path).unwrap();
    let mut at = 0;
    let mut events = Vec::new();
    while at < data.len() {
        let length = &data[at..at + 8];
        let n = u64::from_le_bytes(length.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[at + 8..at + 12].try_into().unwrap());
        assert_eq!(crc, masked_crc(length), "length checksum");
        let body = &data[at + 12..at + 12 + n];
        let crc = u32::from_le_bytes(data[at + 12 + n..at + 16 + n].try_into().unwrap());
        assert_eq!(crc, masked_crc(body), "data checksum");
        at += 16 + n;
        let (mut wall, mut step, mut scalars, mut start) = (0.0, 0, Vec::new(), false);
        for (field, _, value) in fields(body) {
            match field {
                1 => wall = f64::from_le_bytes(value.try_into().unwrap()),
                2 => step = u64::from_le_bytes(value.try_into().unwrap()),
                3 => assert_eq!(value, b"brain.Event:2"),
                5 => {
                    for (_, _, entry) in fields(&value) {
                        let entry = fields(&entry);
                        let tag = String::from_utf8(entry[0].2.clone()).unwrap();
                        let v = f32::from_le_bytes(entry[1].2.clone().try_into().unwrap());
                        scalars.push((tag, v));
                    }
                }
                6 => start = fields(&value)[0].2[0] == 1,
                other => panic!("unexpected field {other}"),
            }
        }
        events.push((wall, step, scalars, start));
    }
    events
}

#[test]
fn every_metric_becomes_a_scalar_readable_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = EventWriter::create(dir.path(), None).unwrap();
    for step in 1..=3 {
        let m = StepMetrics {
            step,
            reward_mean: 0.25 * step as f64,
            kl: 1e-3,
            zero_signal_groups: 1,
            ..Default::default()
        };
        writer.step(&m).unwrap();
    }
    let resumed = EventWriter::create(dir.path(), Some(2)).unwrap();
    drop((writer, resumed));
    let mut files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2);
    assert!(files.iter().all(|f| f
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents.")));
    let first = files
        .iter()
        .map(|f| read_events(f))
        .find(|e| e.len() == 4)
        .expect("the file of three steps");
    assert!(
        first[0].2.is_empty() && first[0].0 > 1.7e9,
        "the version event"
    );
    for (i, (_, step, scalars, _)) in first[1..].iter().enumerate() {
        assert_eq!(*step, i as u64 + 1);
        let get = |tag: &str| scalars.iter().find(|(t, _)| t == tag).map(|(_, v)| *v);
        assert_eq!(get("train/reward_mean"), Some(0.25 * (i + 1) as f32));
        assert_eq!(get("train/zero_signal_groups"), Some(1.0));
        assert_eq!(get("train/kl"), Some(1e-3));
        assert_eq!(get("train/step"), None);
        // Every other number of the step is there too.
        let numbers = serde_json::to_value(StepMetrics::default()).unwrap();
        let numbers = numbers.as_object().unwrap().len() - 1;
        assert_eq!(scalars.len(), numbers, "{scalars:?}");
    }
    let second = files
        .iter()
        .map(|f| read_events(f))
        .find(|e| e.len() == 2)
        .expect("the resumed file");
    assert!(second[1].3 && second[1].1 == 2, "a session start at step 2");
}
