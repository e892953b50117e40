//! Countdown: combine the given numbers with + − × ÷ and parentheses, each
//! exactly once, to reach the target. Verified with a real parser and exact
//! rational arithmetic; nothing is ever `eval`-ed.

use num_rational::Ratio;
use num_traits::{CheckedAdd, CheckedDiv, CheckedMul, CheckedSub};

use serde_json::Value;

use crate::{Task, Verdict};

/// Longest expression accepted, in bytes: hostile input fails fast.
pub const MAX_ANSWER_LEN: usize = 256;
/// Deepest parenthesis nesting accepted: no stack overflow on `((((…`.
pub const MAX_DEPTH: usize = 32;

pub struct Countdown;

/// A record's numbers and target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Puzzle {
    pub nums: Vec<u64>,
    pub target: i64,
}

impl Puzzle {
    pub fn from_record(record: &Value) -> Result<Self, String> {
        let nums = record
            .get("nums")
            .and_then(Value::as_array)
            .ok_or("missing 'nums' (a list of non-negative integers)")?
            .iter()
            .map(|n| {
                n.as_u64()
                    .ok_or_else(|| format!("'nums' holds {n}, not a non-negative integer"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if nums.is_empty() {
            return Err("'nums' is empty".into());
        }
        let target = record
            .get("target")
            .and_then(Value::as_i64)
            .ok_or("missing 'target' (an integer)")?;
        Ok(Self { nums, target })
    }
}

impl Task for Countdown {
    fn name(&self) -> &'static str {
        "countdown"
    }

    fn check_record(&self, record: &Value) -> Result<(), String> {
        Puzzle::from_record(record).map(|_| ())
    }

    /// The answer alone, no chain of thought: the paper's models answered
    /// that way, and a 1.5B model that reasons step by step runs out of any
    /// budget a CPU run can afford before its `<answer>` tag.
    fn user_prompt(&self, record: &Value) -> String {
        let p = Puzzle::from_record(record).expect("records are checked when read");
        format!(
            "Using the numbers {:?}, create an equation that equals {}. You can use basic arithmetic operations (+, -, *, /) and parentheses, and each number must be used exactly once. Reply with only the final equation (without the result) inside <answer> </answer> tags, for example <answer> (1 + 2) * 3 </answer>, and no explanation.",
            p.nums, p.target
        )
    }

    fn verify(&self, record: &Value, answer: &str) -> Verdict {
        match Puzzle::from_record(record) {
            Ok(puzzle) => verify(&puzzle, answer),
            Err(e) => Verdict::fail(format!("bad record: {e}")),
        }
    }

    fn reflection_instruction(&self) -> &'static str {
        "You tried the task above but got the wrong answer. Reflect on what went wrong and write a short explanation that will help you do better next time."
    }
}

/// The text inside the last complete `<answer>…</answer>` block.
pub fn extract_answer(text: &str) -> Result<&str, &'static str> {
    let Some(open) = text.rfind("<answer>") else {
        return Err("no <answer> tag");
    };
    let after = &text[open + "<answer>".len()..];
    match after.find("</answer>") {
        Some(close) => Ok(&after[..close]),
        None => {
            // An unterminated last block: fall back to the last complete one.
            let before = &text[..open];
            match before
                .rfind("</answer>")
                .and_then(|close| before[..close].rfind("<answer>").map(|o| (o, close)))
            {
                Some((o, close)) => Ok(&before[o + "<answer>".len()..close]),
                None => Err("unterminated <answer> tag"),
            }
        }
    }
}

/// Judges a full reply (with its `<answer>` tags) against a puzzle.
pub fn verify(puzzle: &Puzzle, reply: &str) -> Verdict {
    let inner = match extract_answer(reply) {
        Ok(inner) => inner.trim(),
        Err(reason) => return Verdict::fail(reason),
    };
    match check_expression(puzzle, inner) {
        Ok(()) => Verdict::pass(),
        Err(reason) => Verdict::fail(reason),
    }
}

/// Checks an expression (optionally ending in `= target`).
pub fn check_expression(puzzle: &Puzzle, text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("empty answer".into());
    }
    if text.len() > MAX_ANSWER_LEN {
        return Err(format!("answer is longer than {MAX_ANSWER_LEN} characters"));
    }
    let expression = match text.split_once('=') {
        None => text,
        Some((lhs, rhs)) => {
            let stated = rhs.trim();
            if stated.parse::<i64>().ok() != Some(puzzle.target) {
                return Err(format!(
                    "states the result '{stated}', but the target is {}",
                    puzzle.target
                ));
            }
            lhs
        }
    };
    let expr = parse(expression)?;
    let mut used = Vec::new();
    expr.numbers(&mut used);
    check_numbers(&puzzle.nums, &used)?;
    let value = expr.eval()?;
    if value != Rational::from(puzzle.target as i128) {
        return Err(format!("evaluates to {value}, not {}", puzzle.target));
    }
    Ok(())
}

fn check_numbers(given: &[u64], used: &[u64]) -> Result<(), String> {
    let count = |list: &[u64], n: u64| list.iter().filter(|&&x| x == n).count();
    for &n in used {
        let (u, g) = (count(used, n), count(given, n));
        if g == 0 {
            return Err(format!("uses {n}, which is not in {given:?}"));
        }
        if u > g {
            return Err(format!(
                "uses {n} {u} times, but it is given {g} time{}",
                if g == 1 { "" } else { "s" }
            ));
        }
    }
    for &n in given {
        if count(used, n) < count(given, n) {
            return Err(format!("does not use {n}"));
        }
    }
    Ok(())
}

/// An exact fraction in lowest terms with a positive denominator.
pub type Rational = Ratio<i128>;

/// `lhs op rhs`, failing on division by zero or overflow.
pub fn apply(op: Op, lhs: Rational, rhs: Rational) -> Result<Rational, String> {
    if op == Op::Div && rhs == Rational::from(0) {
        return Err("divides by zero".into());
    }
    let value = match op {
        Op::Add => lhs.checked_add(&rhs),
        Op::Sub => lhs.checked_sub(&rhs),
        Op::Mul => lhs.checked_mul(&rhs),
        Op::Div => lhs.checked_div(&rhs),
    };
    value.ok_or_else(|| "the arithmetic overflows 128 bits".to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
}

impl Op {
    pub fn symbol(self) -> char {
        match self {
            Op::Add => '+',
            Op::Sub => '-',
            Op::Mul => '*',
            Op::Div => '/',
        }
    }
}

/// A parsed expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Num(u64),
    Bin(Op, Box<Expr>, Box<Expr>),
}

impl Expr {
    fn numbers(&self, out: &mut Vec<u64>) {
        match self {
            Expr::Num(n) => out.push(*n),
            Expr::Bin(_, a, b) => {
                a.numbers(out);
                b.numbers(out);
            }
        }
    }

    pub fn eval(&self) -> Result<Rational, String> {
        match self {
            Expr::Num(n) => Ok(Rational::from(*n as i128)),
            Expr::Bin(op, a, b) => apply(*op, a.eval()?, b.eval()?),
        }
    }
}

/// Parses `+ - * /`, parentheses and non-negative integers; rejects
/// everything else with a reason.
pub fn parse(text: &str) -> Result<Expr, String> {
    let mut parser = Parser {
        bytes: text.as_bytes(),
        pos: 0,
        depth: 0,
    };
    let expr = parser.expr()?;
    parser.skip_spaces();
    match parser.peek() {
        None => Ok(expr),
        Some(b')') => Err("unbalanced ')'".into()),
        Some(_) => Err(parser.unexpected()),
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn unexpected(&self) -> String {
        let rest = std::str::from_utf8(&self.bytes[self.pos..]).unwrap_or("");
        match rest.chars().next() {
            Some('^') => "'^' is not an allowed operator".into(),
            Some('.') => "decimals are not allowed".into(),
            Some('*') if self.pos > 0 && self.bytes[self.pos - 1] == b'*' => {
                "'**' is not an allowed operator".into()
            }
            Some(c) => format!("unexpected character '{c}'"),
            None => "unexpected end of expression".into(),
        }
    }

    fn expr(&mut self) -> Result<Expr, String> {
        let mut lhs = self.term()?;
        loop {
            self.skip_spaces();
            let op = match self.peek() {
                Some(b'+') => Op::Add,
                Some(b'-') => Op::Sub,
                _ => return Ok(lhs),
            };
            self.pos += 1;
            lhs = Expr::Bin(op, Box::new(lhs), Box::new(self.term()?));
        }
    }

    fn term(&mut self) -> Result<Expr, String> {
        let mut lhs = self.factor()?;
        loop {
            self.skip_spaces();
            let op = match self.peek() {
                Some(b'*') => Op::Mul,
                Some(b'/') => Op::Div,
                _ => return Ok(lhs),
            };
            self.pos += 1;
            lhs = Expr::Bin(op, Box::new(lhs), Box::new(self.factor()?));
        }
    }

    fn factor(&mut self) -> Result<Expr, String> {
        self.skip_spaces();
        match self.peek() {
            Some(b'(') => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(format!("parentheses nested deeper than {MAX_DEPTH}"));
                }
                self.pos += 1;
                let inner = self.expr()?;
                self.skip_spaces();
                if self.peek() != Some(b')') {
                    return Err("unbalanced '('".into());
                }
                self.pos += 1;
                self.depth -= 1;
                Ok(inner)
            }
            Some(b'0'..=b'9') => {
                let start = self.pos;
                while self.peek().is_some_and(|b| b.is_ascii_digit()) {
                    self.pos += 1;
                }
                if self.peek() == Some(b'.') {
                    return Err("decimals are not allowed".into());
                }
                let digits =
                    std::str::from_utf8(&self.bytes[start..self.pos]).expect("ascii digits");
                // Every 64-bit number is exact: arithmetic is in 128-bit
                // rationals, which report an overflow rather than wrap.
                digits
                    .parse::<u64>()
                    .map(Expr::Num)
                    .map_err(|_| format!("number {digits} does not fit in 64 bits"))
            }
            Some(b'-') => Err("unary minus is not allowed".into()),
            Some(b'+') => Err("unary plus is not allowed".into()),
            _ => Err(self.unexpected()),
        }
    }
}
