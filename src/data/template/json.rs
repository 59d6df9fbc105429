//! Python's `json.dumps` and `repr(float)` over template values: transformers replaces Jinja's
//! `tojson` (which HTML-escapes and uses compact separators) with plain `json.dumps`, and tool
//! definitions reach the prompt through it, so every separator and escape must be Python's.

use std::fmt::Write;

use minijinja::value::{from_args, Kwargs, Rest, Value, ValueKind, ValueOrKwargs};
use minijinja::{Error, ErrorKind};

/// The `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
/// Arguments may be positional (in that order) or named, as in Python.
pub(super) fn tojson(value: &Value, args: Rest<ValueOrKwargs>) -> Result<String, Error> {
    let args = args.into_values();
    type Args = (Option<Value>, Option<Value>, Option<Value>, Option<Value>, Kwargs);
    let (ensure_ascii, indent, separators, sort_keys, kwargs) = from_args::<Args>(&args)?;
    let pick = |positional: Option<Value>, name: &str| -> Result<Value, Error> {
        let named: Option<Value> = kwargs.get(name)?;
        Ok(named.or(positional).unwrap_or(Value::from(())))
    };
    let ensure_ascii = pick(ensure_ascii, "ensure_ascii")?.is_true();
    let indent = indent_string(&pick(indent, "indent")?)?;
    let separators = pick(separators, "separators")?;
    let sort_keys = pick(sort_keys, "sort_keys")?.is_true();
    kwargs.assert_all_used()?;
    // Python: with an indent, the item separator drops its trailing space (newlines replace it).
    let (item_sep, key_sep) = if separators.is_none() {
        (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string())
    } else {
        let mut parts = separators.try_iter()?.map(|s| s.as_str().map(str::to_string));
        match (parts.next().flatten(), parts.next().flatten(), parts.next()) {
            (Some(item), Some(key), None) => (item, key),
            _ => return Err(invalid("separators must be a pair of strings")),
        }
    };
    let dumper = Dumper { ensure_ascii, indent, item_sep, key_sep, sort_keys };
    let mut out = String::new();
    dumper.dump(value, 0, &mut out)?;
    Ok(out)
}

fn indent_string(indent: &Value) -> Result<Option<String>, Error> {
    match indent.kind() {
        ValueKind::None | ValueKind::Undefined => Ok(None),
        // `' ' * indent`: a negative indent is an empty one, not an error.
        ValueKind::Number if indent.is_integer() => Ok(Some(" ".repeat(indent.as_i64().unwrap_or(0).max(0) as usize))),
        ValueKind::String => Ok(indent.as_str().map(str::to_string)),
        _ => Err(invalid("indent must be an integer or a string")),
    }
}

struct Dumper {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl Dumper {
    fn dump(&self, value: &Value, level: usize, out: &mut String) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => write!(out, "{value}").map_err(Error::from)?,
            ValueKind::Number => out.push_str(&json_float(as_f64(value)?)),
            ValueKind::String => push_json_string(value.as_str().unwrap_or_default(), self.ensure_ascii, out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.dump_container(('[', ']'), &items, level, out, |this, item, level, out| {
                    this.dump(item, level, out)
                })?;
            }
            ValueKind::Map => {
                let mut entries = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    entries.push((json_key(&key)?, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.dump_container(('{', '}'), &entries, level, out, |this, (key, item), level, out| {
                    push_json_string(key, this.ensure_ascii, out);
                    out.push_str(&this.key_sep);
                    this.dump(item, level, out)
                })?;
            }
            _ => {
                return Err(invalid(format!("Object of type {} is not JSON serializable", value.kind())));
            }
        }
        Ok(())
    }

    /// Python's `_iterencode_list` / `_iterencode_dict` layout: empty containers stay `[]`/`{}`,
    /// otherwise each item goes on its own line when indenting.
    fn dump_container<T>(
        &self,
        (open, close): (char, char),
        items: &[T],
        level: usize,
        out: &mut String,
        dump_item: impl Fn(&Self, &T, usize, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        let newline = |depth: usize| self.indent.as_ref().map(|unit| format!("\n{}", unit.repeat(depth)));
        let inner = newline(level + 1);
        if let Some(inner) = &inner {
            out.push_str(inner);
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
                if let Some(inner) = &inner {
                    out.push_str(inner);
                }
            }
            dump_item(self, item, level + 1, out)?;
        }
        if let Some(outer) = newline(level) {
            out.push_str(&outer);
        }
        out.push(close);
        Ok(())
    }
}

/// Python converts these key types to strings; anything else is a `TypeError`.
fn json_key(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::None => Ok("null".into()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.into()),
        ValueKind::Number if key.is_integer() => Ok(key.to_string()),
        ValueKind::Number => Ok(json_float(as_f64(key)?)),
        other => Err(invalid(format!("keys must be str, int, float, bool or None, not {other}"))),
    }
}

fn as_f64(value: &Value) -> Result<f64, Error> {
    f64::try_from(value.clone())
}

fn json_float(f: f64) -> String {
    match f {
        f if f.is_nan() => "NaN".into(),
        f64::INFINITY => "Infinity".into(),
        f64::NEG_INFINITY => "-Infinity".into(),
        f => py_float_repr(f),
    }
}

/// `repr(float)`: the shortest digits that round-trip (as Rust's `{:e}` gives them), written in
/// fixed notation when the decimal exponent is in [-4, 16) and in scientific notation otherwise.
pub(super) fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let decpt = exp + 1;
    let body = if decpt <= -4 || decpt > 16 {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{first}{fraction}e{exp_sign}{:02}", exp.abs())
    } else if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat(decpt.unsigned_abs() as usize))
    } else if decpt as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(decpt as usize - digits.len()))
    } else {
        let (int, frac) = digits.split_at(decpt as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

/// `json.encoder.py_encode_basestring(_ascii)`: the short escapes, `\u00XX` for other control
/// characters, and with `ensure_ascii` everything above `~` (DEL included) as `\uXXXX`, with
/// surrogate pairs beyond the BMP. `/` is never escaped.
fn push_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && c > '~' => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, message.into())
}
