//! Canonical text of a value as PostgreSQL would print it (DateStyle ISO,
//! timestamptz in UTC), so every spelling of a value encrypts and indexes
//! the same way.

use std::fmt::Write as _;

use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike};

use super::{invalid, ValueError};
use crate::config::DeclaredType;

/// Validates `input` (the value's text form as a client sent it) and
/// returns its canonical text.
pub fn canonical_text(ty: DeclaredType, input: &[u8]) -> Result<String, ValueError> {
    let text = std::str::from_utf8(input).map_err(|_| invalid(ty, "not valid UTF-8"))?;
    use DeclaredType as T;
    match ty {
        T::Text | T::Varchar => Ok(text.to_owned()),
        T::Bytea => Ok(bytea_hex(
            &parse_bytea(text).ok_or(invalid(ty, "not a bytea literal"))?,
        )),
        T::Int2 => parse_int::<i16>(ty, text),
        T::Int4 => parse_int::<i32>(ty, text),
        T::Int8 => parse_int::<i64>(ty, text),
        T::Float8 => parse_float(text)
            .map(format_float)
            .ok_or(invalid(ty, "not a floating-point number")),
        T::Numeric => canonical_numeric(text.trim()).ok_or(invalid(ty, "not a number")),
        T::Bool => parse_bool(text)
            .map(|b| if b { "t" } else { "f" }.to_owned())
            .ok_or(invalid(ty, "not a boolean")),
        T::Date | T::Timestamp | T::Timestamptz => match Infinity::parse(text) {
            Some(infinity) => Ok(infinity.text().to_owned()),
            None => finite_datetime(ty, text.trim()),
        },
        T::Uuid => uuid::Uuid::parse_str(text.trim())
            .map(|u| u.hyphenated().to_string())
            .map_err(|_| invalid(ty, "not a UUID")),
        T::Jsonb => super::jsonb::canonical_jsonb(text).map_err(|reason| invalid(ty, reason)),
    }
}

/// A finite date or timestamp's canonical text.
fn finite_datetime(ty: DeclaredType, text: &str) -> Result<String, ValueError> {
    match ty {
        DeclaredType::Date => parse_date(text)
            .map(format_date)
            .ok_or(invalid(ty, "expected YYYY-MM-DD")),
        DeclaredType::Timestamp => parse_timestamp(text)
            .map(format_timestamp)
            .ok_or(invalid(ty, "expected YYYY-MM-DD HH:MM:SS[.ffffff]")),
        _ => parse_timestamptz(text)
            .map(format_timestamptz)
            .ok_or(invalid(
                ty,
                "expected YYYY-MM-DD HH:MM:SS[.ffffff] with an explicit UTC offset",
            )),
    }
}

/// `infinity` and `-infinity`, which date, timestamp and timestamptz read
/// in any case and print in lower case (`+infinity` is refused, as by
/// PostgreSQL 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Infinity {
    /// Later than every other value.
    Future,
    /// Earlier than every other value.
    Past,
}

impl Infinity {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("infinity") {
            Some(Self::Future)
        } else if text.eq_ignore_ascii_case("-infinity") {
            Some(Self::Past)
        } else {
            None
        }
    }

    pub(crate) fn text(self) -> &'static str {
        match self {
            Self::Future => "infinity",
            Self::Past => "-infinity",
        }
    }
}

fn parse_int<N: std::str::FromStr + ToString>(
    ty: DeclaredType,
    text: &str,
) -> Result<String, ValueError> {
    text.trim()
        .parse::<N>()
        .map(|n| n.to_string())
        .map_err(|_| invalid(ty, "not an integer in range"))
}

/// Parses PostgreSQL's bytea text: `\x` hex, or the escape format.
pub fn parse_bytea(text: &str) -> Option<Vec<u8>> {
    if let Some(digits) = text.strip_prefix("\\x") {
        if let Some(bytes) = decode_hex(digits.as_bytes()) {
            return Some(bytes);
        }
        // PostgreSQL allows whitespace between digit pairs.
        let digits: Vec<u8> = digits
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        return decode_hex(&digits);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
        } else if bytes.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let octal = std::str::from_utf8(bytes.get(i + 1..i + 4)?).ok()?;
            out.push(u8::from_str_radix(octal, 8).ok()?);
            i += 4;
        }
    }
    Some(out)
}

/// Hex digits (either case) to bytes; `None` if any pair is not hex.
fn decode_hex(digits: &[u8]) -> Option<Vec<u8>> {
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let mut out = vec![0u8; digits.len() / 2];
    faster_hex::hex_decode(digits, &mut out).ok()?;
    Some(out)
}

/// bytea in hex output format.
pub(crate) fn bytea_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(2 + bytes.len() * 2);
    out.push_str("\\x");
    out.push_str(&faster_hex::hex_string(bytes));
    out
}

pub(crate) fn parse_float(text: &str) -> Option<f64> {
    let t = text.trim();
    match t.to_ascii_lowercase().as_str() {
        "nan" => Some(f64::NAN),
        "infinity" | "+infinity" | "inf" | "+inf" => Some(f64::INFINITY),
        "-infinity" | "-inf" => Some(f64::NEG_INFINITY),
        _ if t
            .chars()
            .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') =>
        {
            None
        }
        _ => t.parse().ok(),
    }
}

/// float8 output as PostgreSQL 12+ prints it: shortest exact digits,
/// exponent form below 1e-4 and from 1e15 on.
pub(crate) fn format_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".to_owned();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..15).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    format!("{v}")
}

/// Digits `numeric` holds before the point (weight 32767 in base 10000).
const NUMERIC_MAX_INT_DIGITS: i64 = 131_072;
/// Digits `numeric` holds after the point (dscale 16383).
const NUMERIC_MAX_SCALE: i64 = 16_383;

/// Canonical numeric text as PostgreSQL 15's `numeric_in` and `numeric_out`
/// make it: plain decimal, the scale as written less the exponent, and the
/// same limits (PostgreSQL refuses the rest with "value overflows numeric
/// format").
pub(crate) fn canonical_numeric(text: &str) -> Option<String> {
    match text.to_ascii_lowercase().as_str() {
        "nan" => return Some("NaN".to_owned()),
        "infinity" | "+infinity" | "inf" | "+inf" => return Some("Infinity".to_owned()),
        "-infinity" | "-inf" => return Some("-Infinity".to_owned()),
        _ => {}
    }
    let (negative, body) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(pos) => (&body[..pos], body[pos + 1..].parse::<i64>().ok()?),
        None => (body, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || exp.unsigned_abs() >= u64::from(i32::MAX.unsigned_abs() / 2)
    {
        return None;
    }
    let digits = [int.as_bytes(), frac.as_bytes()].concat();
    let len = i64::try_from(digits.len()).ok()?;
    // Where the decimal point falls within `digits` once the exponent moves it.
    let point = i64::try_from(int.len()).ok()?.checked_add(exp)?;
    let scale = len.checked_sub(point)?.max(0);
    let first = digits.iter().position(|d| *d != b'0');
    let int_digits = match first {
        Some(first) => point.saturating_sub(i64::try_from(first).ok()?).max(0),
        None => 0,
    };
    if int_digits > NUMERIC_MAX_INT_DIGITS || scale > NUMERIC_MAX_SCALE {
        return None;
    }
    // Digit `i` of the value counted from the point's `point`: zeros outside.
    let digit = |i: i64| -> char {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.get(i))
            .map_or('0', |d| char::from(*d))
    };
    let mut out = String::with_capacity(usize::try_from(int_digits + scale).ok()? + 3);
    if negative && first.is_some() {
        out.push('-');
    }
    if int_digits == 0 {
        out.push('0');
    } else {
        (point - int_digits..point).for_each(|i| out.push(digit(i)));
    }
    if scale > 0 {
        out.push('.');
        (point..point + scale).for_each(|i| out.push(digit(i)));
    }
    Some(out)
}

pub(crate) fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// An ISO 8601 date/time as PostgreSQL reads it: a date, an optional time
/// after a space or `T`, and an optional zone (`Z`, `+HH`, `+HH:MM`,
/// `+HHMM`), possibly after a space.
struct DateTimeParts {
    date: NaiveDate,
    time: Option<NaiveTime>,
    /// Offset east of UTC, in seconds.
    offset: Option<i32>,
}

fn split_datetime(text: &str) -> Option<DateTimeParts> {
    let (text, bc) = era(text.trim());
    let date_end = text.find([' ', 'T', 't']).unwrap_or(text.len());
    let date = parse_iso_date(&text[..date_end])?;
    // Years are counted from 1 (1 BC is astronomical year 0), as in
    // PostgreSQL, which refuses year 0 and signed years.
    if date.year() < 1 {
        return None;
    }
    let date = if bc {
        date.with_year(1 - date.year())?
    } else {
        date
    };
    let mut rest = text[date_end..].trim_start_matches([' ', 'T', 't']).trim();
    let mut offset = None;
    if let Some(stripped) = rest.strip_suffix(['Z', 'z']) {
        offset = Some(0);
        rest = stripped.trim();
    } else if let Some(pos) = rest.rfind(['+', '-']) {
        offset = Some(parse_offset(&rest[pos..])?);
        rest = rest[..pos].trim();
    }
    let time = if rest.is_empty() {
        None
    } else {
        Some(
            NaiveTime::parse_from_str(rest, "%H:%M:%S%.f")
                .or_else(|_| NaiveTime::parse_from_str(rest, "%H:%M"))
                .ok()?,
        )
    };
    Some(DateTimeParts { date, time, offset })
}

/// The text without a trailing ` BC` or ` AD` (any case), and whether it
/// was BC.
fn era(text: &str) -> (&str, bool) {
    let Some((rest, word)) = text.rsplit_once([' ', '\t']) else {
        return (text, false);
    };
    if word.eq_ignore_ascii_case("bc") {
        (rest.trim_end(), true)
    } else if word.eq_ignore_ascii_case("ad") {
        (rest.trim_end(), false)
    } else {
        (text, false)
    }
}

/// `+HH`, `+HH:MM`, `+HHMM` or `+HH:MM:SS` → seconds east of UTC.
fn parse_offset(zone: &str) -> Option<i32> {
    let (sign, digits) = match zone.split_at_checked(1)? {
        ("+", d) => (1, d),
        ("-", d) => (-1, d),
        _ => return None,
    };
    let parts: Vec<&str> = if digits.contains(':') {
        digits.split(':').collect()
    } else if digits.len() == 4 {
        vec![&digits[..2], &digits[2..]]
    } else {
        vec![digits]
    };
    if parts.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.is_empty() || p.len() > 2) {
        return None;
    }
    let mut seconds = 0i32;
    for (part, unit) in parts.iter().zip([3600, 60, 1]) {
        seconds += part.parse::<i32>().ok()? * unit;
    }
    (seconds <= 15 * 3600 + 59 * 60).then_some(sign * seconds)
}

/// A date; a time or zone after it is ignored, as PostgreSQL does.
pub(crate) fn parse_date(text: &str) -> Option<NaiveDate> {
    split_datetime(text).map(|p| p.date)
}

/// `YYYY-MM-DD`, read directly when it has exactly that shape (the common
/// case, on every write of a date), else by chrono's parser.
fn parse_iso_date(text: &str) -> Option<NaiveDate> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range).and_then(|d| {
            d.iter().try_fold(0u32, |n, c| {
                c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
            })
        })
    };
    // `YYYY-MM-DD`, or a year of more digits (`12345-06-07`).
    let n = b.len();
    if (10..=12).contains(&n) && b[n - 6] == b'-' && b[n - 3] == b'-' {
        if let (Some(y), Some(m), Some(d)) =
            (digits(0..n - 6), digits(n - 5..n - 3), digits(n - 2..n))
        {
            return NaiveDate::from_ymd_opt(i32::try_from(y).ok()?, m, d);
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()
}

pub(crate) fn format_date(d: NaiveDate) -> String {
    let mut out = String::with_capacity(13);
    let bc = write_date(&mut out, d);
    with_era(out, bc)
}

/// `YYYY-MM-DD` as PostgreSQL prints it (ISO): at least four digits of
/// year, counted from 1; `true` when the year is BC (the caller appends
/// ` BC` after the rest, as PostgreSQL does).
fn write_date(out: &mut String, d: NaiveDate) -> bool {
    let bc = d.year() < 1;
    let year = if bc { 1 - d.year() } else { d.year() };
    let _ = write!(out, "{year:04}-{:02}-{:02}", d.month(), d.day());
    bc
}

fn with_era(mut text: String, bc: bool) -> String {
    if bc {
        text.push_str(" BC");
    }
    text
}

/// A timestamp without time zone; a zone in the input is ignored, as
/// PostgreSQL does.
pub(crate) fn parse_timestamp(text: &str) -> Option<NaiveDateTime> {
    let parts = split_datetime(text)?;
    Some(parts.date.and_time(parts.time.unwrap_or(NaiveTime::MIN)))
}

/// A timestamp with time zone, as UTC. The input must carry its offset:
/// without one PostgreSQL would use the session's TimeZone, which the proxy
/// does not apply, so such input is refused rather than guessed.
pub(crate) fn parse_timestamptz(text: &str) -> Option<NaiveDateTime> {
    let parts = split_datetime(text)?;
    let local = parts.date.and_time(parts.time.unwrap_or(NaiveTime::MIN));
    local.checked_sub_signed(chrono::TimeDelta::seconds(i64::from(parts.offset?)))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][ BC]` with trailing zeros of the fraction
/// trimmed.
pub(crate) fn format_timestamp(ts: NaiveDateTime) -> String {
    let (text, bc) = timestamp_text(ts);
    with_era(text, bc)
}

/// A timestamptz in UTC: `YYYY-MM-DD HH:MM:SS[.ffffff]+00[ BC]`.
pub(crate) fn format_timestamptz(ts: NaiveDateTime) -> String {
    let (mut text, bc) = timestamp_text(ts);
    text.push_str("+00");
    with_era(text, bc)
}

/// The timestamp without its era, and whether it is BC.
fn timestamp_text(ts: NaiveDateTime) -> (String, bool) {
    // chrono keeps a leap second as :59 plus a second of nanoseconds, and
    // prints it as :60.
    let (second, nanos) = match ts.nanosecond().checked_sub(1_000_000_000) {
        Some(nanos) => (ts.second() + 1, nanos),
        None => (ts.second(), ts.nanosecond()),
    };
    let mut out = String::with_capacity(32);
    let bc = write_date(&mut out, ts.date());
    let _ = write!(out, " {:02}:{:02}:{second:02}", ts.hour(), ts.minute());
    let micros = nanos / 1000;
    if micros != 0 {
        let frac = format!("{micros:06}");
        let _ = write!(out, ".{}", frac.trim_end_matches('0'));
    }
    (out, bc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeclaredType as T;

    fn canon(ty: DeclaredType, s: &str) -> String {
        canonical_text(ty, s.as_bytes()).unwrap()
    }

    #[test]
    fn driver_spellings_of_dates_and_times_read_as_postgresql_reads_them() {
        // pgJDBC setDate / setTimestamp / setObject(LocalDateTime), node-pg Date.
        assert_eq!(canon(T::Date, "2024-02-29 +00"), "2024-02-29");
        assert_eq!(
            canon(T::Date, "2024-02-29T00:00:00.000+00:00"),
            "2024-02-29"
        );
        assert_eq!(canon(T::Date, "2024-02-29 23:59:59-05"), "2024-02-29");
        assert_eq!(
            canon(T::Timestamp, "2024-02-29 23:59:59.123456+00"),
            "2024-02-29 23:59:59.123456"
        );
        assert_eq!(
            canon(T::Timestamp, "2024-02-29T23:59:59-0530"),
            "2024-02-29 23:59:59"
        );
        assert_eq!(
            canon(T::Timestamp, "2024-02-29 23:59"),
            "2024-02-29 23:59:00"
        );
        assert_eq!(
            canon(T::Timestamptz, "2024-02-29T23:59:59.500+05:30"),
            canon(T::Timestamptz, "2024-02-29 18:29:59.5Z")
        );
        assert_eq!(
            canon(T::Timestamptz, "2024-03-01 01:00:00 +02"),
            canon(T::Timestamptz, "2024-02-29 23:00:00+00")
        );
        for bad in [
            "2024-02-30",
            "2024-02-29 25:00",
            "2024-02-29 +99",
            "yesterday",
            "",
        ] {
            assert!(
                canonical_text(T::Timestamp, bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
        // Without an offset the session TimeZone would apply: refused, not guessed.
        assert!(canonical_text(T::Timestamptz, b"2024-02-29 12:00:00").is_err());
    }

    #[test]
    fn numbers_have_one_spelling() {
        assert_eq!(canon(T::Int4, " 042"), "42");
        assert!(canonical_text(T::Int2, b"70000").is_err());
        assert_eq!(canon(T::Numeric, "001.50"), "1.50");
        assert_eq!(canon(T::Numeric, "1.5e3"), "1500");
        assert_eq!(canon(T::Numeric, "1.5e-3"), "0.0015");
        assert_eq!(canon(T::Numeric, "-0.00"), "0.00");
        assert_eq!(canon(T::Numeric, ".5"), "0.5");
        assert!(canonical_text(T::Numeric, b"1.2.3").is_err());
        assert_eq!(canon(T::Float8, "1e15"), "1e+15");
        assert_eq!(canon(T::Float8, "123456789012345"), "123456789012345");
        assert_eq!(canon(T::Float8, "0.1"), "0.1");
        assert_eq!(canon(T::Float8, "0.00001"), "1e-05");
        assert_eq!(canon(T::Float8, "-inf"), "-Infinity");
    }

    #[test]
    fn dates_and_timestamps_are_written_and_read_as_postgresql_prints_them() {
        // (astronomical year, month, day) → PostgreSQL 15's ISO output
        // (checked with psql: BC years counted from 1, more than four
        // digits printed as they are).
        for (y, m, d, text) in [
            (1, 2, 3, "0001-02-03"),
            (1980, 2, 29, "1980-02-29"),
            (9999, 12, 31, "9999-12-31"),
            (10000, 1, 1, "10000-01-01"),
            (12345, 6, 7, "12345-06-07"),
            (0, 12, 31, "0001-12-31 BC"),
            (-1, 12, 31, "0002-12-31 BC"),
            (-43, 3, 15, "0044-03-15 BC"),
            (-4712, 11, 24, "4713-11-24 BC"),
        ] {
            let date = NaiveDate::from_ymd_opt(y, m, d).unwrap();
            assert_eq!(format_date(date), text);
            assert_eq!(parse_date(text), Some(date), "{text}");
            assert_eq!(canon(T::Date, text), text);
            let ts = date.and_hms_micro_opt(12, 0, 0, 500_000).unwrap();
            let (day, era) = text.split_at(10.max(text.find(' ').unwrap_or(text.len())));
            assert_eq!(format_timestamp(ts), format!("{day} 12:00:00.5{era}"));
            assert_eq!(format_timestamptz(ts), format!("{day} 12:00:00.5+00{era}"));
            assert_eq!(
                canon(T::Timestamp, &format_timestamp(ts)),
                format_timestamp(ts)
            );
            assert_eq!(
                canon(T::Timestamptz, &format_timestamptz(ts)),
                format_timestamptz(ts)
            );
        }
        assert_eq!(canon(T::Date, "0044-03-15 bc"), "0044-03-15 BC");
        assert_eq!(canon(T::Date, "12345-06-07 AD"), "12345-06-07");
        // PostgreSQL refuses year 0 and signed years.
        for bad in ["0000-01-01", "0000-01-01 BC", "-0044-03-15"] {
            assert!(canonical_text(T::Date, bad.as_bytes()).is_err(), "{bad}");
        }
        for bad in [
            "2024-02-30",
            "2024-13-01",
            "2024-1-01x",
            "abcd-ef-gh",
            "2024/01/01",
        ] {
            assert_eq!(
                parse_iso_date(bad),
                NaiveDate::parse_from_str(bad, "%Y-%m-%d").ok(),
                "{bad}"
            );
        }
        // A leap second (chrono reads `:60` as one) prints as chrono does.
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_micro_opt(23, 59, 59, 1_500_000)
            .unwrap();
        assert_eq!(format_timestamp(leap), "2016-12-31 23:59:60.5");
        let whole = leap.with_nanosecond(1_000_000_000).unwrap();
        assert_eq!(format_timestamp(whole), "2016-12-31 23:59:60");
        assert_eq!(
            parse_iso_date("2024-1-5"),
            NaiveDate::from_ymd_opt(2024, 1, 5),
            "other widths still go to chrono"
        );
    }

    #[test]
    fn dates_times_and_others() {
        assert_eq!(canon(T::Bool, "YES"), "t");
        assert_eq!(canon(T::Date, "2024-02-29"), "2024-02-29");
        assert!(canonical_text(T::Date, b"2023-02-29").is_err());
        assert_eq!(
            canon(T::Timestamp, "2024-01-02T03:04:05.120"),
            "2024-01-02 03:04:05.12"
        );
        assert_eq!(
            canon(T::Timestamptz, "2024-01-02 03:04:05+02"),
            "2024-01-02 01:04:05+00"
        );
        assert_eq!(
            canon(T::Timestamptz, "2024-01-02T03:04:05Z"),
            "2024-01-02 03:04:05+00"
        );
        assert!(canonical_text(T::Timestamptz, b"2024-01-02 03:04:05").is_err());
        assert_eq!(
            canon(T::Uuid, "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"),
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        );
        assert_eq!(
            canon(T::Jsonb, r#"{"bb":1,"a":[1,2]}"#),
            r#"{"a": [1, 2], "bb": 1}"#
        );
        assert_eq!(canon(T::Bytea, "\\xDEAD"), "\\xdead");
        assert_eq!(canon(T::Bytea, "a\\\\b\\001"), "\\x615c6201");
    }

    #[test]
    fn jsonb_keeps_numbers_exactly_as_postgresql_does() {
        // Each pair: input, `SELECT $1::jsonb::text` on PostgreSQL 15.
        for (input, postgres) in [
            ("12345678901234567890123", "12345678901234567890123"),
            ("0.1000", "0.1000"),
            ("1E2", "100"),
            ("1E+2", "100"),
            ("1.50E1", "15.0"),
            ("1e-3", "0.001"),
            ("-1e-2", "-0.01"),
            ("-0", "0"),
            ("-0.0", "0.0"),
            (" [1 , 2 ] ", "[1, 2]"),
            (
                r#"{"b":1,"a":2,"b":3, "aa":"x\u00e9\n\u001f/\""}"#,
                r#"{"a": 2, "b": 3, "aa": "xé\n\u001f/\""}"#,
            ),
            (r#""\ud83d\ude00""#, "\"😀\""),
            ("[]", "[]"),
            ("{}", "{}"),
        ] {
            assert_eq!(canon(T::Jsonb, input), postgres, "{input}");
        }
        let big = canon(T::Jsonb, "1e400");
        assert_eq!(big.len(), 401);
        assert!(big.starts_with('1') && big[1..].bytes().all(|b| b == b'0'));
        assert_eq!(canon(T::Jsonb, "1e-16383").len(), 16385);
        assert_eq!(canon(T::Jsonb, "1e131071").len(), 131_072);
    }

    #[test]
    fn jsonb_refuses_what_postgresql_refuses() {
        for bad in [
            "01",
            "1.",
            ".5",
            "+1",
            "NaN",
            "1e-16384",
            "1e131072",
            r#""\u0000""#,
            r#""\ud800""#,
            "\"a\tb\"",
            "\"a\u{9}b\"",
            "[1,]",
            "{\"a\"}",
            "truex",
            "1a",
            "",
            "\u{c}1",
        ] {
            assert!(canonical_text(T::Jsonb, bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn deep_jsonb_neither_overflows_the_stack_nor_is_refused() {
        let depth = 100_000;
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        assert_eq!(canon(T::Jsonb, &text), text);
        let objects = format!("{}1{}", r#"{"k": "#.repeat(depth), "}".repeat(depth));
        assert_eq!(canon(T::Jsonb, &objects), objects);
    }

    #[test]
    fn infinite_dates_and_timestamps_read_as_postgresql_reads_them() {
        assert_eq!(canon(T::Date, "infinity"), "infinity");
        assert_eq!(canon(T::Date, " -Infinity "), "-infinity");
        assert_eq!(canon(T::Timestamp, "INFINITY"), "infinity");
        assert_eq!(canon(T::Timestamptz, "-infinity"), "-infinity");
        assert!(canonical_text(T::Date, b"+infinity").is_err());
    }

    #[test]
    fn errors_never_echo_the_value() {
        let err = canonical_text(T::Int4, b"secret-123").unwrap_err();
        assert!(!err.to_string().contains("secret"));
    }
}
