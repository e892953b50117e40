//! The function-call verifier against the nasty cases, and a property test
//! of the extractor.

use proptest::prelude::*;
use r3_tasks::function_calling::extract_calls;

use serde_json::{json, Value};

fn record(answers: Value) -> Value {
    let tools = json!([
        {"name": "get_weather", "description": "Weather for a city",
         "parameters": {"city": {"type": "str", "description": "City"},
                        "unit": {"type": "str, optional", "description": "Unit", "default": "celsius"}}},
        {"name": "add", "description": "Add numbers",
         "parameters": {"a": {"type": "float"}, "b": {"type": "float"}}},
        {"name": "search", "description": "Search",
         "parameters": {"query": {"type": "str"}, "filters": {"type": "dict", "default": {}}}}
    ]);
    json!({"query": "q", "tools": tools.to_string(), "answers": answers.to_string()})
}

fn verdict(answers: Value, reply: &str) -> r3_tasks::Verdict {
    r3_tasks::builtin("function-calling")
        .unwrap()
        .verify(&record(answers), reply)
}

#[test]
fn verdicts_for_nasty_replies() {
    let weather =
        json!([{"name": "get_weather", "arguments": {"city": "Paris", "unit": "fahrenheit"}}]);
    let parallel = json!([
        {"name": "add", "arguments": {"a": 1, "b": 2}},
        {"name": "get_weather", "arguments": {"city": "Oslo"}}
    ]);
    let nested = json!([{"name": "search", "arguments": {"query": "x", "filters": {"year": [2020, 2021], "lang": "en"}}}]);
    let cases: &[(&Value, &str, Result<(), &str>)] = &[
        (&weather, r#"[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "fahrenheit"}}]"#, Ok(())),
        (&weather, r#"[{"arguments": {"unit": "fahrenheit", "city": "Paris"}, "name": "get_weather"}]"#, Ok(())),
        (&weather, r#"[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "F"}}]"#, Err("argument 'unit' is 'F', expected 'fahrenheit'")),
        (&weather, r#"[{"name": "get_weather", "arguments": {"city": "Paris"}}]"#, Err("missing argument 'unit'")),
        (&weather, r#"[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "fahrenheit", "days": 3}}]"#, Err("unexpected argument 'days'")),
        (&weather, r#"[{"name": "get_forecast", "arguments": {"city": "Paris"}}]"#, Err("expected a call to 'get_weather', got 'get_forecast'")),
        (&weather, r#"[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "fahrenheit"}"#, Err("no JSON list")),
        (&weather, "Sure! Here you go: [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"fahrenheit\"}}] Hope it helps.", Ok(())),
        (&weather, "```json\n[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"fahrenheit\"}}]\n```", Ok(())),
        (&weather, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"fahrenheit\"}}\n</tool_call>", Ok(())),
        (&weather, "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": </tool_call>", Err("invalid JSON")),
        (&weather, "I cannot help with that.", Err("no JSON list")),
        // Echoed tool definitions (Qwen's <tools> block, a JSON list) are not calls.
        (&weather, "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}\n</tools>\n\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"fahrenheit\"}}", Ok(())),
        (&weather, r#"Tools: [{"name": "get_weather", "description": "Weather for a city", "parameters": {"city": {"type": "str"}}}] Call: [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "fahrenheit"}}]"#, Ok(())),
        (&weather, r#"{"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}"#, Err("no JSON list")),
        (&weather, "[]", Err("expected 1 call(s), got 0")),
        (&parallel, r#"[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "add", "arguments": {"a": 1.0, "b": 2}}]"#, Ok(())),
        // The default unit, passed explicitly, is the same call.
        (&parallel, r#"[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]"#, Ok(())),
        (&parallel, r#"[{"name": "add", "arguments": {"a": 1, "b": 2}}]"#, Err("expected 2 call(s), got 1")),
        (&parallel, r#"[{"name": "add", "arguments": {"a": "1", "b": 2}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]"#, Err("argument 'a' is '1', expected 1")),
        (&parallel, r#"[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]"#, Err("expected a call to 'get_weather', got 'add'")),
        (&nested, r#"[{"name": "search", "arguments": {"filters": {"lang": "en", "year": [2020, 2021]}, "query": "x"}}]"#, Ok(())),
        (&nested, r#"[{"name": "search", "arguments": {"filters": {"lang": "en", "year": [2021, 2020]}, "query": "x"}}]"#, Err("argument 'filters'")),
        (&nested, r#"{"name": "search", "arguments": {"query": "x", "filters": {"year": [2020, 2021], "lang": "en"}}}"#, Ok(())),
        (&nested, r#"[{"name": "search", "arguments": "{\"query\": \"x\", \"filters\": {\"year\": [2020, 2021], \"lang\": \"en\"}}"}]"#, Ok(())),
        (&nested, r#"[{"name": "search", "arguments": {"query": "X", "filters": {"year": [2020, 2021], "lang": "en"}}}]"#, Err("argument 'query' is 'X', expected 'x'")),
    ];
    for (answers, reply, expected) in cases {
        let v = verdict((*answers).clone(), reply);
        match expected {
            Ok(()) => assert!(v.success, "{reply}: {}", v.reason),
            Err(reason) => {
                assert!(!v.success, "{reply} should fail");
                assert!(
                    v.reason.contains(reason),
                    "{reply}: reason '{}' lacks '{reason}'",
                    v.reason
                );
            }
        }
    }
}

#[test]
fn bad_records_are_rejected() {
    let task = r3_tasks::builtin("function-calling").unwrap();
    assert!(task
        .check_record(&json!({"query": "q", "tools": "not json", "answers": "[]"}))
        .unwrap_err()
        .contains("'tools' is not valid JSON"));
    assert!(task
        .check_record(&json!({"tools": "[]", "answers": "[]"}))
        .unwrap_err()
        .contains("query"));
    let good = record(json!([]));
    assert!(task.check_record(&good).is_ok());
    assert!(task.user_prompt(&good).contains("get_weather"));
}

#[test]
fn the_shipped_data_set_is_well_formed_and_its_answers_verify() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/function_calling.jsonl");
    let task = r3_tasks::builtin("function-calling").unwrap();
    let records = r3_tasks::read_records(&path, task.as_ref(), false)
        .unwrap()
        .records;
    assert!(records.len() >= 60, "{} records", records.len());
    let mut tools = std::collections::BTreeSet::new();
    let (mut parallel, mut nested, mut optional) = (0, 0, 0);
    for r in &records {
        let answers: Value = serde_json::from_str(r.value["answers"].as_str().unwrap()).unwrap();
        let t: Value = serde_json::from_str(r.value["tools"].as_str().unwrap()).unwrap();
        for tool in t.as_array().unwrap() {
            tools.insert(tool["name"].as_str().unwrap().to_string());
            if tool["parameters"]
                .as_object()
                .unwrap()
                .values()
                .any(|p| p.get("default").is_some())
            {
                optional += 1;
            }
        }
        parallel += (answers.as_array().unwrap().len() > 1) as usize;
        nested += answers.to_string().contains("{\"") as usize
            * answers.as_array().unwrap().iter().any(|c| {
                c["arguments"]
                    .as_object()
                    .unwrap()
                    .values()
                    .any(|v| v.is_object() || v.is_array())
            }) as usize;
        let v = task.verify(&r.value, &answers.to_string());
        assert!(
            v.success,
            "line {}: its own answer fails: {}",
            r.line, v.reason
        );
    }
    assert!(tools.len() >= 15, "{} tools", tools.len());
    assert!(
        parallel >= 10 && nested >= 5 && optional >= 10,
        "parallel {parallel}, nested {nested}, optional {optional}"
    );
}

/// Two calls written as two blocks are two calls, however they are
/// written: two fences (as Qwen2.5-Coder writes parallel calls when it
/// does), two bare objects, or a fenced tool echo before the call, which
/// is passed over. (The extractor once read only the last fence, and so
/// failed correct parallel answers.)
#[test]
fn calls_written_as_separate_blocks_all_count() {
    let parallel = json!([
        {"name": "add", "arguments": {"a": 1, "b": 2}},
        {"name": "get_weather", "arguments": {"city": "Oslo"}}
    ]);
    let add = r#"{"name": "add", "arguments": {"a": 1, "b": 2}}"#;
    let oslo = r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#;
    let echo = r#"{"name": "add", "description": "Add numbers", "parameters": {"type": "object", "properties": {}}}"#;
    for reply in [
        format!("First:\n```json\n{add}\n```\nThen:\n```json\n{oslo}\n```"),
        format!("{add}\n{oslo}"),
        format!("```json\n{echo}\n```\n```json\n[{add}, {oslo}]\n```"),
        format!("```json\n{add}\n```\n```\nnot json\n```\n```json\n{oslo}\n```"),
    ] {
        let v = verdict(parallel.clone(), &reply);
        assert!(v.success, "{reply}: {}", v.reason);
    }
    // One call written once is one call, and a second block repeating it
    // is a second call.
    let v = verdict(
        json!([{"name": "add", "arguments": {"a": 1, "b": 2}}]),
        &format!("```json\n{add}\n```\n```json\n{add}\n```"),
    );
    assert_eq!(v.reason, "expected 1 call(s), got 2");
}

proptest! {
    #[test]
    fn fenced_calls_all_count(n in 1usize..6, prose in "[A-Za-z .]{0,30}") {
        let calls: Vec<Value> = (0..n).map(|i| json!({"name": "add", "arguments": {"a": i, "b": 2}})).collect();
        let reply: String = calls
            .iter()
            .map(|c| format!("{prose}\n```json\n{c:#}\n```\n"))
            .collect();
        let found = extract_calls(&reply).unwrap();
        prop_assert_eq!(found.len(), n);
        for (i, call) in found.iter().enumerate() {
            prop_assert_eq!(&call.arguments["a"], &json!(i));
        }
    }

    #[test]
    fn extractor_never_panics(s in "\\PC{0,400}") {
        let _ = extract_calls(&s);
        let _ = verdict(json!([{"name": "add", "arguments": {"a": 1, "b": 2}}]), &s);
    }

    #[test]
    fn extractor_never_panics_on_json_like_text(s in "[\\[\\]{}\":,a-z0-9 <>/`_]{0,400}") {
        let _ = extract_calls(&s);
        let _ = extract_calls(&format!("<tool_call>{s}</tool_call>"));
    }

    #[test]
    fn calls_survive_prose_and_key_order(city in "[A-Za-z ]{1,20}", a in -1000i64..1000, noise in "[A-Za-z .!?]{0,40}") {
        let expected = json!([{"name": "add", "arguments": {"a": a, "b": 2}}, {"name": "get_weather", "arguments": {"city": city}}]);
        let reply = format!("{noise} [{{\"name\": \"get_weather\", \"arguments\": {{\"city\": {}}}}}, {{\"arguments\": {{\"b\": 2.0, \"a\": {a}}}, \"name\": \"add\"}}] {noise}", json!(city));
        let v = verdict(expected, &reply);
        prop_assert!(v.success, "{}", v.reason);
    }
}
