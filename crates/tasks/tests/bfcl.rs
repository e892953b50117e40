//! BFCL's AST checker rule by rule (each rule with a reply that passes and
//! one that fails, and the reason naming the rule), the real BFCL records
//! judged against their own ground truth, and property tests showing that
//! no reply makes the extractor or the checker panic.

use proptest::prelude::*;
use r3_tasks::bfcl::checker::standardize;
use r3_tasks::{builtin, Task};
use serde_json::{json, Value};

fn bfcl() -> Box<dyn Task> {
    builtin("bfcl").unwrap()
}

/// A record with one tool whose parameters are `properties` (all listed as
/// required where `required` says) and one expected call.
fn record(properties: Value, required: &[&str], truth: Value) -> Value {
    json!({
        "id": "simple_python_0",
        "question": [[{"role": "user", "content": "Do it."}]],
        "function": [{"name": "tool.run", "description": "d",
            "parameters": {"type": "dict", "properties": properties, "required": required}}],
        "ground_truth": [{"tool.run": truth}],
    })
}

fn call(arguments: Value) -> String {
    json!([{"name": "tool.run", "arguments": arguments}]).to_string()
}

#[test]
fn each_checker_rule_passes_and_fails_with_its_reason() {
    let s = |t: &str| json!({"type": t});
    // (rule, record, passing reply, failing reply, words of the reason)
    let rows: Vec<(&str, Value, String, String, &str)> = vec![
        (
            "number of calls",
            record(json!({"a": s("integer")}), &["a"], json!({"a": [1]})),
            call(json!({"a": 1})),
            json!([{"name": "tool.run", "arguments": {"a": 1}}, {"name": "tool.run", "arguments": {"a": 1}}]).to_string(),
            "expected 1 call(s), got 2",
        ),
        (
            "function name",
            record(json!({"a": s("integer")}), &["a"], json!({"a": [1]})),
            call(json!({"a": 1})),
            json!([{"name": "tool_run", "arguments": {"a": 1}}]).to_string(),
            "expected a call to 'tool.run', got 'tool_run'",
        ),
        (
            "required argument present",
            record(json!({"a": s("integer"), "b": s("integer")}), &["a", "b"], json!({"a": [1], "b": [2]})),
            call(json!({"a": 1, "b": 2})),
            call(json!({"a": 1})),
            "missing required argument 'b'",
        ),
        (
            "no unknown argument",
            record(json!({"a": s("integer")}), &["a"], json!({"a": [1]})),
            call(json!({"a": 1})),
            call(json!({"a": 1, "z": 3})),
            "unexpected argument 'z'",
        ),
        (
            "a declared argument the answer does not expect is unknown too",
            record(json!({"a": s("integer"), "b": s("integer")}), &["a"], json!({"a": [1]})),
            call(json!({"a": 1})),
            call(json!({"a": 1, "b": 2})),
            "unexpected argument 'b'",
        ),
        (
            "left out only where \"\" is acceptable",
            record(json!({"a": s("integer"), "u": s("string"), "v": s("string")}), &["a"],
                json!({"a": [1], "u": ["m", ""], "v": ["x"]})),
            call(json!({"a": 1, "v": "x"})),
            call(json!({"a": 1, "u": "m"})),
            "missing argument 'v', which is not optional",
        ),
        (
            "type as declared",
            record(json!({"a": s("integer")}), &["a"], json!({"a": [1]})),
            call(json!({"a": 1})),
            call(json!({"a": "1"})),
            "should be of type integer, got str",
        ),
        (
            "an int is accepted for a float",
            record(json!({"x": s("float")}), &["x"], json!({"x": [2.0]})),
            call(json!({"x": 2})),
            call(json!({"x": "2.0"})),
            "should be of type float",
        ),
        (
            "a float is not an int",
            record(json!({"a": s("integer")}), &["a"], json!({"a": [2]})),
            call(json!({"a": 2})),
            call(json!({"a": 2.0})),
            "should be of type integer, got float",
        ),
        (
            "a bool is not an int",
            record(json!({"a": s("integer")}), &["a"], json!({"a": [1]})),
            call(json!({"a": 1})),
            call(json!({"a": true})),
            "got bool",
        ),
        (
            "array items typed as declared",
            record(json!({"l": {"type": "array", "items": s("integer")}}), &["l"], json!({"l": [[1, 2]]})),
            call(json!({"l": [1, 2]})),
            call(json!({"l": [1, "2"]})),
            "should be a array of int items",
        ),
        (
            "strings compared after standardisation",
            record(json!({"c": s("string")}), &["c"], json!({"c": ["New York, NY"]})),
            call(json!({"c": "new york ny"})),
            call(json!({"c": "Boston"})),
            "argument 'c' is \"Boston\", expected one of [\"New York, NY\"]",
        ),
        (
            "other values compared by value",
            record(json!({"a": s("integer")}), &["a"], json!({"a": [1, 3]})),
            call(json!({"a": 3})),
            call(json!({"a": 2})),
            "argument 'a' is 2",
        ),
        (
            "lists compared element by element, strings standardised",
            record(json!({"l": {"type": "array", "items": s("string")}}), &["l"], json!({"l": [["San Francisco", "LA"]]})),
            call(json!({"l": ["san_francisco", "la"]})),
            call(json!({"l": ["LA", "San Francisco"]})),
            "argument 'l'",
        ),
        (
            "dicts compared key by key",
            record(json!({"d": s("dict")}), &["d"], json!({"d": [{"k": ["v"], "opt": ["", 1]}]})),
            call(json!({"d": {"k": "V"}})),
            call(json!({"d": {"k": "v", "extra": 1}})),
            "argument 'd'",
        ),
        (
            "a dict's key is missing unless optional",
            record(json!({"d": s("dict")}), &["d"], json!({"d": [{"k": ["v"], "n": [2]}]})),
            call(json!({"d": {"k": "v", "n": 2}})),
            call(json!({"d": {"k": "v"}})),
            "argument 'd'",
        ),
        (
            "lists of dicts compared in order",
            record(json!({"l": {"type": "array", "items": s("dict")}}), &["l"],
                json!({"l": [[{"k": ["a"]}, {"k": ["b"]}]]})),
            call(json!({"l": [{"k": "a"}, {"k": "b"}]})),
            call(json!({"l": [{"k": "b"}, {"k": "a"}]})),
            "argument 'l'",
        ),
        (
            "a value of the answer's own type is a variable, compared as it is",
            record(json!({"a": s("integer")}), &["a"], json!({"a": ["n"]})),
            call(json!({"a": "n"})),
            call(json!({"a": "N"})),
            "argument 'a' is \"N\"",
        ),
    ];
    let task = bfcl();
    for (rule, record, pass, fail, reason) in &rows {
        task.check_record(record)
            .unwrap_or_else(|e| panic!("{rule}: {e}"));
        let verdict = task.verify(record, pass);
        assert!(
            verdict.success,
            "{rule}: {pass} should pass: {}",
            verdict.reason
        );
        let verdict = task.verify(record, fail);
        assert!(!verdict.success, "{rule}: {fail} should fail");
        assert!(
            verdict.reason.contains(reason),
            "{rule}: reason '{}' lacks '{reason}'",
            verdict.reason
        );
    }
}

#[test]
fn parallel_calls_match_in_any_order_each_call_once() {
    let record = json!({
        "id": "parallel_0",
        "question": [[{"role": "user", "content": "Weather in Paris and Rome."}]],
        "function": [{"name": "weather", "parameters": {"type": "dict",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
        "ground_truth": [{"weather": {"city": ["Paris"]}}, {"weather": {"city": ["Rome"]}}],
    });
    let task = bfcl();
    let reply = |a: &str, b: &str| {
        json!([{"name": "weather", "arguments": {"city": a}}, {"name": "weather", "arguments": {"city": b}}]).to_string()
    };
    assert!(task.verify(&record, &reply("Rome", "Paris")).success);
    assert!(task.verify(&record, &reply("paris", "ROME")).success);
    let twice = task.verify(&record, &reply("Paris", "Paris"));
    assert!(
        !twice.success && twice.reason.contains("argument 'city' is \"Paris\""),
        "{}",
        twice.reason
    );
    // The same calls in Qwen's <tool_call> tags.
    let tagged = "<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    assert!(task.verify(&record, tagged).success);
}

#[test]
fn standardisation_is_bfcls() {
    assert_eq!(standardize("New York, NY"), "newyorkny");
    assert_eq!(standardize("a_b-c.d/e*f^g h"), "abcdefgh");
    assert_eq!(standardize("it's"), "it\"s");
}

#[test]
fn bad_records_are_named() {
    let task = bfcl();
    let good = record(json!({"a": {"type": "integer"}}), &["a"], json!({"a": [1]}));
    let cases = [
        (
            "/function/0/parameters/properties/a/type",
            json!("number"),
            "unknown type 'number'",
        ),
        (
            "/ground_truth/0/tool.run/a",
            json!(1),
            "not a list of acceptable values",
        ),
        ("/question", json!([]), "0 turns"),
        // Records no answer can pass: the issue's attacks.
        (
            "/function/0/parameters/properties",
            json!([]),
            "'properties' must be an object",
        ),
        (
            "/function/0/parameters/required",
            json!(["a", "ghost"]),
            "required parameter 'ghost' is not among its properties",
        ),
    ];
    for (pointer, value, message) in cases {
        let mut bad = good.clone();
        *bad.pointer_mut(pointer).unwrap() = value;
        let e = task.check_record(&bad).unwrap_err();
        assert!(e.contains(message), "{pointer}: {e}");
    }
    let mut unknown = good.clone();
    unknown["ground_truth"] = json!([{"other": {}}]);
    assert!(task
        .check_record(&unknown)
        .unwrap_err()
        .contains("'other', which is not among the tools"));
}

/// The first acceptable value that is not `""` (none: leave it out).
fn first_value(alternatives: &Value) -> Option<Value> {
    let first = alternatives.as_array()?.iter().find(|v| **v != json!(""))?;
    Some(chosen(first))
}

/// An acceptable value as a reply holds it: a dict's acceptable values are
/// themselves lists of alternatives per key, also inside lists.
fn chosen(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter_map(|(k, alternatives)| Some((k.clone(), first_value(alternatives)?)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(chosen).collect()),
        other => other.clone(),
    }
}

/// The reply a perfect model gives: the first acceptable value of each
/// declared argument, leaving out those whose only value is `""` (and the
/// few the ground truth lists that the tool does not declare, which BFCL
/// would reject).
fn ground_truth_reply(record: &Value, reversed: bool) -> String {
    let mut calls: Vec<Value> = record["ground_truth"]
        .as_array()
        .unwrap()
        .iter()
        .map(|call| {
            let (name, args) = call.as_object().unwrap().iter().next().unwrap();
            let tool = record["function"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["name"] == *name)
                .unwrap();
            let declared = &tool["parameters"]["properties"];
            let arguments: serde_json::Map<String, Value> = args
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| declared.get(k.as_str()).is_some())
                .filter_map(|(k, values)| Some((k.clone(), first_value(values)?)))
                .collect();
            json!({"name": name, "arguments": arguments})
        })
        .collect();
    if reversed {
        calls.reverse();
    }
    Value::Array(calls).to_string()
}

/// Every real record is well formed and accepts its own ground truth, in
/// either order; a reply with a call missing fails on the count.
#[test]
fn real_bfcl_records_accept_their_ground_truth() {
    let task = bfcl();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/bfcl");
    let (mut n, mut overlaps) = (0, 0);
    for category in ["simple_python", "multiple", "parallel", "parallel_multiple"] {
        let path = format!("{dir}/{category}.jsonl");
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, line) in text.lines().enumerate() {
            let record: Value = serde_json::from_str(line).unwrap();
            task.check_record(&record)
                .unwrap_or_else(|e| panic!("{path}:{}: {e}", i + 1));
            let reply = ground_truth_reply(&record, false);
            let verdict = task.verify(&record, &reply);
            assert!(
                verdict.success,
                "{path}:{}: {reply}: {}",
                i + 1,
                verdict.reason
            );
            // In reverse order too, unless one expected call also accepts
            // another's reply: BFCL matches greedily, in the answer's order,
            // and so does r3 (parallel.jsonl:179 is such a record).
            let reversed = task.verify(&record, &ground_truth_reply(&record, true));
            assert!(
                reversed.success || overlapping(task.as_ref(), &record),
                "{path}:{}: {}",
                i + 1,
                reversed.reason
            );
            overlaps += usize::from(!reversed.success);
            let mut short: Vec<Value> =
                serde_json::from_str(&ground_truth_reply(&record, false)).unwrap();
            short.pop();
            let verdict = task.verify(&record, &Value::Array(short).to_string());
            assert!(
                !verdict.success && verdict.reason.starts_with("expected"),
                "{}",
                verdict.reason
            );
            n += 1;
        }
    }
    assert_eq!(n, 1000);
    assert!(overlaps <= 5, "{overlaps} records fail in reverse order");
}

/// Whether some expected call of `record` accepts another expected call's
/// ground-truth reply.
fn overlapping(task: &dyn Task, record: &Value) -> bool {
    let truth = record["ground_truth"].as_array().unwrap();
    let replies: Vec<Value> = serde_json::from_str(&ground_truth_reply(record, false)).unwrap();
    (0..truth.len()).any(|i| {
        (0..truth.len()).filter(|&j| j != i).any(|j| {
            let mut single = record.clone();
            single["ground_truth"] = json!([truth[i]]);
            task.verify(&single, &json!([replies[j]]).to_string())
                .success
        })
    })
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[a-zA-Z ,._'-]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-c]", inner, 0..4).prop_map(|m| json!(m)),
        ]
    })
}

proptest! {
    #[test]
    fn checker_never_panics_on_any_arguments(a in any_json(), l in any_json(), d in any_json(), extra in any_json()) {
        let record = record(
            json!({"a": {"type": "float"}, "l": {"type": "array", "items": {"type": "dict"}}, "d": {"type": "dict"}}),
            &["a"],
            json!({"a": [1.5, ""], "l": [[{"k": ["v"]}], ""], "d": [{"k": ["v", ""], "n": [1]}, ""]}),
        );
        let task = bfcl();
        let _ = task.verify(&record, &call(json!({"a": a, "l": l, "d": d})));
        let _ = task.verify(&record, &call(json!({"a": extra})));
    }

    #[test]
    fn extractor_and_checker_never_panic_on_text(s in "\\PC{0,300}") {
        let record = record(json!({"a": {"type": "integer"}}), &["a"], json!({"a": [1]}));
        let _ = bfcl().verify(&record, &s);
        let _ = bfcl().verify(&record, &format!("<tool_call>{s}</tool_call>"));
    }

    #[test]
    fn checker_never_panics_on_any_record(truth in any_json(), props in any_json()) {
        let record = json!({"id": "x", "question": [[{"role": "user", "content": "q"}]],
            "function": [{"name": "f", "parameters": {"properties": props}}],
            "ground_truth": truth});
        let task = bfcl();
        let _ = task.check_record(&record);
        let _ = task.verify(&record, r#"[{"name": "f", "arguments": {"a": 1}}]"#);
    }
}
