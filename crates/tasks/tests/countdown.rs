//! The Countdown verifier against the nasty cases, and property tests of
//! its parser and of the generator.

use proptest::prelude::*;
use r3_tasks::countdown::{check_expression, extract_answer, parse, verify, Puzzle};
use r3_tasks::countdown_data::{generate, solve, Difficulty};
use r3_tasks::Task;
use serde_json::json;

fn puzzle() -> Puzzle {
    Puzzle {
        nums: vec![3, 7, 25],
        target: 46,
    }
}

#[test]
fn verdicts_for_nasty_answers() {
    let p = puzzle();
    let cases: &[(&str, Result<(), &str>)] = &[
        ("<answer>3 * 7 + 25</answer>", Ok(())),
        ("<answer> (25 + 3*7) </answer>", Ok(())),
        ("<answer>3*7+25 = 46</answer>", Ok(())),
        (
            "<answer>3*7+25 = 45</answer>",
            Err("states the result '45'"),
        ),
        (
            "<answer>3 * 7 + 25 + 3</answer>",
            Err("uses 3 2 times, but it is given 1 time"),
        ),
        ("<answer>3 * 7</answer>", Err("does not use 25")),
        (
            "<answer>4 * 7 + 25</answer>",
            Err("uses 4, which is not in [3, 7, 25]"),
        ),
        (
            "<answer>21 + 25</answer>",
            Err("uses 21, which is not in [3, 7, 25]"),
        ),
        (
            "<answer>25 - 3 - 7</answer>",
            Err("evaluates to 15, not 46"),
        ),
        ("<answer>25 / (7 - 7) + 3</answer>", Err("uses 7 2 times")),
        (
            "<answer>-3 + 7 * 25</answer>",
            Err("unary minus is not allowed"),
        ),
        (
            "<answer>3.0 * 7 + 25</answer>",
            Err("decimals are not allowed"),
        ),
        (
            "<answer>3 ** 7 + 25</answer>",
            Err("'**' is not an allowed operator"),
        ),
        (
            "<answer>3 ^ 7 + 25</answer>",
            Err("'^' is not an allowed operator"),
        ),
        (
            "<answer>__import__('os')</answer>",
            Err("unexpected character '_'"),
        ),
        (
            "<answer>3*7+25; rm -rf /</answer>",
            Err("unexpected character ';'"),
        ),
        (
            "<answer>eval(3*7+25)</answer>",
            Err("unexpected character 'e'"),
        ),
        ("<answer></answer>", Err("empty answer")),
        ("<answer>   </answer>", Err("empty answer")),
        ("the answer is 3*7+25", Err("no <answer> tag")),
        ("<answer>3*7+25", Err("unterminated <answer> tag")),
        ("<answer>(3*7+25</answer>", Err("unbalanced '('")),
        ("<answer>3*7+25)</answer>", Err("unbalanced ')'")),
        ("<answer>1+1</answer> then <answer>3*7+25</answer>", Ok(())),
        (
            "<answer>3*7+25</answer> no wait <answer>3+7+25</answer>",
            Err("evaluates to 35, not 46"),
        ),
        ("<answer>3*7+25</answer> and <answer>3+7", Ok(())),
    ];
    for (reply, expected) in cases {
        let v = verify(&p, reply);
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
fn exact_rationals() {
    // 6 * 10 / 4 = 15 exactly, though 10 / 4 is not an integer.
    let p = Puzzle {
        nums: vec![6, 10, 4],
        target: 15,
    };
    assert_eq!(check_expression(&p, "6 * 10 / 4"), Ok(()));
    assert_eq!(check_expression(&p, "10 / 4 * 6"), Ok(()));
    let p = Puzzle {
        nums: vec![1, 3, 3],
        target: 1,
    };
    assert_eq!(check_expression(&p, "1 / 3 * 3"), Ok(()));
    let p = Puzzle {
        nums: vec![5, 5, 1],
        target: 0,
    };
    assert!(check_expression(&p, "1 / (5 - 5)")
        .unwrap_err()
        .contains("divides by zero"));
    let p = Puzzle {
        nums: vec![2, 3],
        target: 1,
    };
    assert!(check_expression(&p, "2 / 3")
        .unwrap_err()
        .contains("evaluates to 2/3"));
}

#[test]
fn hostile_input_fails_fast() {
    let p = puzzle();
    let deep = format!("{}3{}", "(".repeat(10_000), ")".repeat(10_000));
    assert!(check_expression(&p, &deep)
        .unwrap_err()
        .contains("longer than"));
    let deep = format!("{}3{}", "(".repeat(40), ")".repeat(40));
    assert!(check_expression(&p, &deep)
        .unwrap_err()
        .contains("nested deeper"));
    assert!(check_expression(&p, "99999999999999999999 + 3")
        .unwrap_err()
        .contains("number 99999999999999999999 does not fit in 64 bits"));
    let huge = Puzzle {
        nums: vec![1_000_000_000; 6],
        target: 1,
    };
    let product = "1000000000*1000000000*1000000000*1000000000*1000000000*1000000000";
    assert!(check_expression(&huge, product)
        .unwrap_err()
        .contains("overflow"));
}

#[test]
fn records_prompt_and_task_interface() {
    let task = r3_tasks::builtin("countdown").unwrap();
    let record = json!({"nums": [3, 7, 25], "target": 46, "extra": "kept"});
    assert!(task.check_record(&record).is_ok());
    assert!(task.user_prompt(&record).contains("[3, 7, 25]"));
    assert!(task.verify(&record, "<answer>3*7+25</answer>").success);
    assert!(task
        .check_record(&json!({"nums": [3, -1], "target": 2}))
        .is_err());
    assert!(task
        .check_record(&json!({"nums": [3], "target": "2"}))
        .is_err());
}

#[test]
fn generator_is_deterministic_and_every_record_is_solvable() {
    let difficulty = Difficulty {
        count: 3..=4,
        max_number: 100,
        target: 1..=100,
    };
    let a = generate(50, &difficulty, 7).unwrap();
    assert_eq!(a, generate(50, &difficulty, 7).unwrap());
    assert_ne!(a, generate(50, &difficulty, 8).unwrap());
    let task = r3_tasks::countdown::Countdown;
    for record in &a {
        let p = Puzzle::from_record(record).unwrap();
        assert!((3..=4).contains(&p.nums.len()) && (1..=100).contains(&p.target));
        let solution = record["solution"].as_str().unwrap();
        let verdict = task.verify(record, &format!("<answer>{solution}</answer>"));
        assert!(verdict.success, "{record}: {}", verdict.reason);
        assert!(solve(&p.nums, p.target).is_some());
    }
}

#[test]
fn solver_knows_unsolvable_puzzles() {
    assert_eq!(solve(&[1, 1], 5), None);
    assert!(solve(&[3, 7, 25], 46).is_some());
}

proptest! {
    #[test]
    fn parser_never_panics_on_random_text(s in "\\PC{0,300}") {
        let _ = parse(&s);
        let _ = verify(&puzzle(), &s);
        let _ = extract_answer(&s);
    }

    #[test]
    fn parser_never_panics_on_expression_like_text(s in "[0-9+*/() .=^-]{0,300}") {
        let _ = check_expression(&puzzle(), &s);
        let _ = verify(&puzzle(), &format!("<answer>{s}</answer>"));
    }

    #[test]
    fn solver_solutions_verify(nums in proptest::collection::vec(1u64..60, 2..=4), pick in 0usize..1000) {
        let all = r3_tasks::countdown_data::all_solutions(&nums);
        prop_assume!(!all.is_empty());
        let (target, expression) = all.iter().nth(pick % all.len()).unwrap();
        let p = Puzzle { nums: nums.clone(), target: *target as i64 };
        prop_assert_eq!(check_expression(&p, expression), Ok(()));
    }
}

/// Every integer that fits in 64 bits is exact; a product past 128 bits
/// fails saying so.
#[test]
fn large_integers_are_exact() {
    let big = Puzzle {
        nums: vec![99_999_999_999, 1, 1],
        target: 100_000_000_001,
    };
    assert_eq!(check_expression(&big, "99999999999+1+1"), Ok(()));
    assert!(check_expression(&big, "99999999999*1+1")
        .unwrap_err()
        .contains("evaluates to 100000000000"));
    let max = Puzzle {
        nums: vec![u64::MAX, 1],
        target: i64::MAX,
    };
    assert!(check_expression(&max, "18446744073709551615 - 1")
        .unwrap_err()
        .contains("evaluates to 18446744073709551614"));
    let overflow = Puzzle {
        nums: vec![u64::MAX; 3],
        target: 1,
    };
    let e = check_expression(&overflow, &["18446744073709551615"; 3].join("*")).unwrap_err();
    assert!(e.contains("overflows 128 bits"), "{e}");
}
