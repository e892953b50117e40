//! Plain answers, JSONL reading and prompt overrides.

use std::io::Write;

use proptest::prelude::*;
use r3_tasks::answer::{normalize, reply_number};
use r3_tasks::{read_records, Prompts, TaskError};
use serde_json::json;

fn verdict(record: serde_json::Value, reply: &str) -> r3_tasks::Verdict {
    r3_tasks::builtin("answer").unwrap().verify(&record, reply)
}

#[test]
fn numeric_answers() {
    let r = json!({"prompt": "What is 21 - 7? Reply with the number only.", "answer": 14});
    for (reply, ok) in [
        ("14", true),
        ("The answer is 14.", true),
        ("21 - 7 = 14", true),
        ("14.0", true),
        ("I think 12... no, #### 14", true),
        ("#### 14\nActually 15", true),
        ("15", false),
        ("fourteen", false),
        ("", false),
        ("-14", false),
    ] {
        assert_eq!(
            verdict(r.clone(), reply).success,
            ok,
            "{reply:?}: {}",
            verdict(r.clone(), reply).reason
        );
    }
    let big = json!({"prompt": "p", "answer": "1,234,567"});
    assert!(verdict(big.clone(), "It is 1,234,567 in total").success);
    assert!(verdict(json!({"prompt": "p", "answer": -3}), "x = -3").success);
    assert!(verdict(json!({"prompt": "p", "answer": 2.5}), "2.50").success);
    assert_eq!(verdict(r, "15").reason, "answered 15, expected 14");
}

#[test]
fn text_answers() {
    let r = json!({"prompt": "Capital of France?", "answer": "Paris"});
    assert!(verdict(r.clone(), "  paris. ").success);
    assert!(!verdict(r.clone(), "Lyon").success);
    let exact = json!({"prompt": "p", "answer": "Paris", "match": "exact"});
    assert!(verdict(exact.clone(), "Paris\n").success);
    assert!(!verdict(exact, "paris").success);
    assert_eq!(normalize("  Hello,   World! "), "hello world");
    assert_eq!(reply_number("no numbers"), None);
    let task = r3_tasks::builtin("answer").unwrap();
    assert!(task
        .check_record(&json!({"prompt": "p", "answer": "x", "match": "fuzzy"}))
        .is_err());
    assert!(task
        .check_record(&json!({"prompt": "p", "answer": "x", "match": "numeric"}))
        .is_err());
}

#[test]
fn malformed_lines_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{}", json!({"nums": [1, 2], "target": 3})).unwrap();
    writeln!(f).unwrap();
    writeln!(f, "{{\"nums\": [1, 2], ").unwrap();
    writeln!(f, "{}", json!({"nums": [1, 2]})).unwrap();
    writeln!(f, "[1, 2]").unwrap();
    writeln!(f, "{}", json!({"nums": [4, 5], "target": 9})).unwrap();
    drop(f);
    let task = r3_tasks::builtin("countdown").unwrap();
    match read_records(&path, task.as_ref(), false) {
        Err(TaskError::Record {
            path: p,
            line,
            message,
        }) => {
            assert!(p.ends_with("data.jsonl"));
            assert_eq!(line, 3);
            assert!(message.contains("invalid JSON"), "{message}");
        }
        other => panic!("expected a record error, got {other:?}"),
    }
    let read = read_records(&path, task.as_ref(), true).unwrap();
    assert_eq!(read.skipped, 3);
    assert_eq!(
        read.records.iter().map(|r| r.line).collect::<Vec<_>>(),
        vec![1, 6]
    );
    let e = read_records(&dir.path().join("missing.jsonl"), task.as_ref(), false).unwrap_err();
    assert!(e.to_string().contains("missing.jsonl"));
}

#[test]
fn prompts_default_to_the_paper_and_can_be_overridden() {
    let task = r3_tasks::builtin("function-calling").unwrap();
    let defaults = Prompts::for_task(task.as_ref());
    assert!(defaults
        .reflection
        .contains("failed to produce the correct tool call"));
    assert_eq!(
        defaults.retry_text("the original question"),
        "the original question"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prompts.toml");
    std::fs::write(
        &path,
        "reflection = \"Why did that fail?\"\nretry = \"Try again.\"\n",
    )
    .unwrap();
    let p = Prompts::from_file(task.as_ref(), &path).unwrap();
    assert_eq!(p.reflection, "Why did that fail?");
    assert_eq!(p.retry_text("q"), "Try again.");
    std::fs::write(&path, "reflektion = \"typo\"\n").unwrap();
    let e = Prompts::from_file(task.as_ref(), &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prompts.toml") && e.contains("reflektion"),
        "{e}"
    );
    let countdown = r3_tasks::builtin("countdown").unwrap();
    assert!(Prompts::for_task(countdown.as_ref())
        .reflection
        .contains("got the wrong answer"));
}

proptest! {
    #[test]
    fn number_extraction_never_panics(s in "\\PC{0,200}") {
        let _ = reply_number(&s);
        let _ = verdict(json!({"prompt": "p", "answer": 3}), &s);
        let _ = verdict(json!({"prompt": "p", "answer": "three"}), &s);
    }
}

/// Integers and decimals compare exactly at any length; a tolerance applies
/// only where the record asks for one.
#[test]
fn numeric_answers_compare_exactly() {
    let r = json!({"prompt": "p", "answer": "123456789012"});
    assert!(!verdict(r.clone(), "123456789100").success);
    assert!(verdict(r, "#### 123,456,789,012").success);
    let long: String = "7".repeat(400);
    let r = json!({"prompt": "p", "answer": long});
    assert!(
        verdict(r.clone(), &long).success,
        "a 400-digit answer can pass"
    );
    let off = format!("{}8", &long[..399]);
    assert!(!verdict(r, &off).success);
    let r = json!({"prompt": "p", "answer": "1000.50"});
    assert!(verdict(r.clone(), "about 1,000.5").success);
    assert!(!verdict(r, "1000.51").success);
    assert!(verdict(json!({"prompt": "p", "answer": "-0"}), "0").success);
    let loose = json!({"prompt": "p", "answer": "3.14159", "tolerance": 0.01});
    assert!(verdict(loose.clone(), "3.14").success);
    assert!(!verdict(loose, "3.2").success);
    let task = r3_tasks::builtin("answer").unwrap();
    assert!(task
        .check_record(&json!({"prompt": "p", "answer": "1", "tolerance": -1}))
        .is_err());
}

/// A line that is not UTF-8 is a bad line like any other: named by its
/// number, skipped with `skip_invalid`.
#[test]
fn non_utf8_lines_are_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    let mut bytes = format!("{}\n", json!({"prompt": "p", "answer": "1"})).into_bytes();
    bytes.extend_from_slice(b"{\"prompt\": \"\xff\xfe\", \"answer\": \"2\"}\n");
    bytes.extend_from_slice(format!("{}\n", json!({"prompt": "q", "answer": "3"})).as_bytes());
    std::fs::write(&path, bytes).unwrap();
    let task = r3_tasks::builtin("answer").unwrap();
    let e = read_records(&path, task.as_ref(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.jsonl:2") && e.contains("not UTF-8"), "{e}");
    let read = read_records(&path, task.as_ref(), true).unwrap();
    assert_eq!(read.skipped, 1);
    assert_eq!(
        read.records.iter().map(|r| r.line).collect::<Vec<_>>(),
        [1, 3]
    );
}

/// A JSON array of records (as xLAM ships its data) reads like the same
/// records a line each: element numbers stand for line numbers in errors,
/// bad elements can be skipped, and broken JSON names where it stopped.
#[test]
fn json_arrays_read_like_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let task = r3_tasks::builtin("countdown").unwrap();
    let records = [
        json!({"nums": [4, 5], "target": 9}),
        json!({"nums": [2, 3], "target": 6}),
    ];
    let array = dir.path().join("data.json");
    std::fs::write(
        &array,
        format!("\n  {}", serde_json::to_string_pretty(&records).unwrap()),
    )
    .unwrap();
    let lines = dir.path().join("data.jsonl");
    std::fs::write(&lines, format!("{}\n{}\n", records[0], records[1])).unwrap();
    let from_array = read_records(&array, task.as_ref(), false).unwrap().records;
    assert_eq!(
        from_array,
        read_records(&lines, task.as_ref(), false).unwrap().records
    );

    let with_bad = json!([records[0], {"nums": "x"}, 7, records[1]]);
    std::fs::write(&array, with_bad.to_string()).unwrap();
    let e = read_records(&array, task.as_ref(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.json:2:") && e.contains("nums"), "{e}");
    let read = read_records(&array, task.as_ref(), true).unwrap();
    assert_eq!(read.skipped, 2);
    assert_eq!(
        read.records.iter().map(|r| r.line).collect::<Vec<_>>(),
        vec![1, 4]
    );

    std::fs::write(&array, format!("[{}, {}", records[0], "{\"nums\": [1,")).unwrap();
    let e = read_records(&array, task.as_ref(), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data.json:2:") && e.contains("invalid JSON in the array"),
        "{e}"
    );
}

/// Writes TinyZero's Countdown layout as parquet, in `row_groups` groups:
/// `target` (int64) and `nums` (a list of int64), with snappy pages.
fn write_countdown_parquet(path: &std::path::Path, rows: &[(i64, Vec<i64>)], row_groups: usize) {
    use parquet::basic::Compression;
    use parquet::data_type::Int64Type;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    let schema = parse_message_type(
        "message countdown {
            REQUIRED INT64 target;
            REQUIRED GROUP nums (LIST) { REPEATED GROUP list { REQUIRED INT64 element; } }
        }",
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema.into(), props.into()).unwrap();
    for group in rows.chunks(rows.len().div_ceil(row_groups)) {
        let mut rg = writer.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let targets: Vec<i64> = group.iter().map(|(t, _)| *t).collect();
        col.typed::<Int64Type>()
            .write_batch(&targets, None, None)
            .unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        // An empty list is one level entry (defined up to the list only)
        // with no value.
        let values: Vec<i64> = group.iter().flat_map(|(_, n)| n.clone()).collect();
        let (mut def, mut rep) = (Vec::new(), Vec::new());
        for (_, n) in group {
            if n.is_empty() {
                def.push(0i16);
                rep.push(0i16);
            }
            for i in 0..n.len() {
                def.push(1);
                rep.push((i > 0) as i16);
            }
        }
        col.typed::<Int64Type>()
            .write_batch(&values, Some(&def), Some(&rep))
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    writer.close().unwrap();
}

/// TinyZero's parquet reads as the same records its JSONL would, across
/// row groups, with rows numbered for errors; a file that is not parquet
/// is named.
#[test]
fn parquet_rows_read_like_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let task = r3_tasks::builtin("countdown").unwrap();
    let rows: Vec<(i64, Vec<i64>)> = (0..7)
        .map(|i| (10 + i, vec![i + 1, 2 * i + 3, 5]))
        .collect();
    let path = dir.path().join("train.parquet");
    write_countdown_parquet(&path, &rows, 3);
    let read = read_records(&path, task.as_ref(), false).unwrap().records;
    assert_eq!(read.len(), 7);
    for (record, (target, nums)) in read.iter().zip(&rows) {
        assert_eq!(record.value, json!({"target": target, "nums": nums}));
    }
    assert_eq!(
        read.iter().map(|r| r.line).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );

    // A row the task refuses is named by its row number.
    let mut bad = rows.clone();
    bad[4].1.clear();
    write_countdown_parquet(&path, &bad, 2);
    let e = read_records(&path, task.as_ref(), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.parquet:5:") && e.contains("'nums' is empty"),
        "{e}"
    );

    std::fs::write(&path, b"not parquet at all").unwrap();
    let e = read_records(&path, task.as_ref(), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.parquet") && e.contains("not a parquet file"),
        "{e}"
    );
}
