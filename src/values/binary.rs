//! Binary wire format of the declared types (as PostgreSQL's `*send` /
//! `*recv` functions), converted from and to canonical text.

use chrono::{NaiveDate, NaiveDateTime, TimeDelta};

use super::canonical::{
    bytea_hex, canonical_numeric, format_date, format_float, format_timestamp, format_timestamptz,
    parse_bool, parse_bytea, parse_date, parse_timestamp, parse_timestamptz, Infinity,
};
use super::{invalid, ValueError};
use crate::config::DeclaredType;

/// `date_send` of `infinity` and `-infinity`.
const DATE_FUTURE: i32 = i32::MAX;
const DATE_PAST: i32 = i32::MIN;
/// `timestamp_send` of `infinity` and `-infinity`.
const TIMESTAMP_FUTURE: i64 = i64::MAX;
const TIMESTAMP_PAST: i64 = i64::MIN;
/// PostgreSQL's first date and timestamp, 4714-11-24 BC, from 2000-01-01.
const DATE_MIN: i32 = -2_451_545;
const TIMESTAMP_MIN: i64 = -211_813_488_000_000_000;
/// Values PostgreSQL refuses, or holds beyond chrono's ±262,142 years
/// (dates after that up to 5874897 AD are refused rather than misread).
const OUT_OF_RANGE: &str = "out of the range cmk-proxy converts";

fn epoch_date() -> NaiveDate {
    NaiveDate::from_ymd_opt(2000, 1, 1).unwrap_or_default()
}

fn epoch() -> NaiveDateTime {
    epoch_date().and_hms_opt(0, 0, 0).unwrap_or_default()
}

/// Converts canonical text to the binary format of `ty`.
pub fn to_binary(ty: DeclaredType, text: &str) -> Result<Vec<u8>, ValueError> {
    use DeclaredType as T;
    let bad = |reason| invalid(ty, reason);
    Ok(match ty {
        T::Text | T::Varchar => text.as_bytes().to_vec(),
        T::Bytea => parse_bytea(text).ok_or(bad("not a bytea literal"))?,
        T::Int2 => text
            .trim()
            .parse::<i16>()
            .map_err(|_| bad("not an int2"))?
            .to_be_bytes()
            .to_vec(),
        T::Int4 => text
            .trim()
            .parse::<i32>()
            .map_err(|_| bad("not an int4"))?
            .to_be_bytes()
            .to_vec(),
        T::Int8 => text
            .trim()
            .parse::<i64>()
            .map_err(|_| bad("not an int8"))?
            .to_be_bytes()
            .to_vec(),
        T::Float8 => super::canonical::parse_float(text)
            .ok_or(bad("not a float8"))?
            .to_bits()
            .to_be_bytes()
            .to_vec(),
        T::Bool => vec![u8::from(parse_bool(text).ok_or(bad("not a boolean"))?)],
        T::Date => match Infinity::parse(text) {
            Some(Infinity::Future) => DATE_FUTURE,
            Some(Infinity::Past) => DATE_PAST,
            None => {
                let d = parse_date(text.trim()).ok_or(bad("not a date"))?;
                i32::try_from((d - epoch_date()).num_days()).map_err(|_| bad(OUT_OF_RANGE))?
            }
        }
        .to_be_bytes()
        .to_vec(),
        T::Timestamp | T::Timestamptz => match Infinity::parse(text) {
            Some(Infinity::Future) => TIMESTAMP_FUTURE,
            Some(Infinity::Past) => TIMESTAMP_PAST,
            None => {
                let ts = if ty == T::Timestamp {
                    parse_timestamp(text.trim()).ok_or(bad("not a timestamp"))?
                } else {
                    parse_timestamptz(text.trim()).ok_or(bad("not a timestamptz"))?
                };
                (ts - epoch()).num_microseconds().ok_or(bad(OUT_OF_RANGE))?
            }
        }
        .to_be_bytes()
        .to_vec(),
        T::Uuid => uuid::Uuid::parse_str(text.trim())
            .map_err(|_| bad("not a uuid"))?
            .as_bytes()
            .to_vec(),
        T::Jsonb => {
            let mut out = Vec::with_capacity(text.len() + 1);
            out.push(1);
            out.extend_from_slice(text.as_bytes());
            out
        }
        T::Numeric => numeric_to_binary(text).ok_or(bad("not a numeric"))?,
    })
}

/// Converts a binary-format value of `ty` to canonical text.
pub fn from_binary(ty: DeclaredType, bytes: &[u8]) -> Result<String, ValueError> {
    use DeclaredType as T;
    let bad = |reason| invalid(ty, reason);
    let fixed = |n: usize| -> Result<&[u8], ValueError> {
        (bytes.len() == n)
            .then_some(bytes)
            .ok_or(bad("wrong binary length"))
    };
    Ok(match ty {
        T::Text | T::Varchar => std::str::from_utf8(bytes)
            .map_err(|_| bad("not valid UTF-8"))?
            .to_owned(),
        T::Bytea => bytea_hex(bytes),
        T::Int2 => i16::from_be_bytes(arr(fixed(2)?)).to_string(),
        T::Int4 => i32::from_be_bytes(arr(fixed(4)?)).to_string(),
        T::Int8 => i64::from_be_bytes(arr(fixed(8)?)).to_string(),
        T::Float8 => format_float(f64::from_bits(u64::from_be_bytes(arr(fixed(8)?)))),
        T::Bool => match fixed(1)?[0] {
            0 => "f".to_owned(),
            1 => "t".to_owned(),
            _ => return Err(bad("not a boolean")),
        },
        T::Date => match i32::from_be_bytes(arr(fixed(4)?)) {
            DATE_FUTURE => Infinity::Future.text().to_owned(),
            DATE_PAST => Infinity::Past.text().to_owned(),
            days if days < DATE_MIN => return Err(bad(OUT_OF_RANGE)),
            days => format_date(
                TimeDelta::try_days(i64::from(days))
                    .and_then(|days| epoch_date().checked_add_signed(days))
                    .ok_or(bad(OUT_OF_RANGE))?,
            ),
        },
        T::Timestamp | T::Timestamptz => match i64::from_be_bytes(arr(fixed(8)?)) {
            TIMESTAMP_FUTURE => Infinity::Future.text().to_owned(),
            TIMESTAMP_PAST => Infinity::Past.text().to_owned(),
            micros if micros < TIMESTAMP_MIN => return Err(bad(OUT_OF_RANGE)),
            micros => {
                let ts = epoch()
                    .checked_add_signed(TimeDelta::microseconds(micros))
                    .ok_or(bad(OUT_OF_RANGE))?;
                if ty == T::Timestamp {
                    format_timestamp(ts)
                } else {
                    format_timestamptz(ts)
                }
            }
        },
        T::Uuid => uuid::Uuid::from_bytes(arr(fixed(16)?))
            .hyphenated()
            .to_string(),
        T::Jsonb => {
            let (version, json) = bytes.split_first().ok_or(bad("empty jsonb"))?;
            if *version != 1 {
                return Err(bad("unknown jsonb binary version"));
            }
            let text = std::str::from_utf8(json).map_err(|_| bad("not valid UTF-8"))?;
            super::canonical_text(ty, text.as_bytes())?
        }
        T::Numeric => numeric_from_binary(bytes).ok_or(bad("malformed numeric"))?,
    })
}

fn arr<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;

/// numeric_send: ndigits, weight, sign, dscale, then base-10000 digits.
fn numeric_to_binary(text: &str) -> Option<Vec<u8>> {
    let canonical = canonical_numeric(text.trim())?;
    let header = |sign: u16, dscale: u16| {
        let mut out = Vec::with_capacity(8);
        out.extend_from_slice(&0i16.to_be_bytes());
        out.extend_from_slice(&0i16.to_be_bytes());
        out.extend_from_slice(&sign.to_be_bytes());
        out.extend_from_slice(&dscale.to_be_bytes());
        out
    };
    // PostgreSQL 15 sends the infinities with a dscale of 32 (the bits of
    // its short header), NaN with 0: the same bytes as numeric_send.
    match canonical.as_str() {
        "NaN" => return Some(header(NUMERIC_NAN, 0)),
        "Infinity" => return Some(header(NUMERIC_PINF, 32)),
        "-Infinity" => return Some(header(NUMERIC_NINF, 32)),
        _ => {}
    }
    let (negative, body) = match canonical.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, canonical.as_str()),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let dscale = u16::try_from(frac.len()).ok()?;
    let int_padded = format!("{}{}", "0".repeat((4 - int.len() % 4) % 4), int);
    let frac_padded = format!("{}{}", frac, "0".repeat((4 - frac.len() % 4) % 4));
    let all = format!("{int_padded}{frac_padded}");
    let mut groups: Vec<i16> = all
        .as_bytes()
        .chunks(4)
        .map(|c| {
            std::str::from_utf8(c)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    let leading = groups.iter().take_while(|g| **g == 0).count();
    groups.drain(..leading);
    let mut weight =
        i16::try_from(i64::try_from(int_padded.len() / 4).ok()? - 1 - i64::try_from(leading).ok()?)
            .ok()?;
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    let mut out = Vec::with_capacity(8 + groups.len() * 2);
    out.extend_from_slice(&u16::try_from(groups.len()).ok()?.to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&(if negative { NUMERIC_NEG } else { NUMERIC_POS }).to_be_bytes());
    out.extend_from_slice(&dscale.to_be_bytes());
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Some(out)
}

fn numeric_from_binary(bytes: &[u8]) -> Option<String> {
    let word = |i: usize| -> Option<u16> {
        Some(u16::from_be_bytes([*bytes.get(i)?, *bytes.get(i + 1)?]))
    };
    let ndigits = word(0)? as usize;
    let weight = word(2)? as i16 as i64;
    let sign = word(4)?;
    let dscale = word(6)? as usize;
    match sign {
        NUMERIC_NAN => return Some("NaN".to_owned()),
        NUMERIC_PINF => return Some("Infinity".to_owned()),
        NUMERIC_NINF => return Some("-Infinity".to_owned()),
        NUMERIC_POS | NUMERIC_NEG => {}
        _ => return None,
    }
    if bytes.len() != 8 + ndigits * 2 {
        return None;
    }
    let digits: Vec<u16> = (0..ndigits)
        .map(|i| word(8 + i * 2))
        .collect::<Option<_>>()?;
    if digits.iter().any(|d| *d > 9999) {
        return None;
    }
    // Integer part: groups with weight >= 0.
    let mut int = String::new();
    for w in (0..=weight.max(0)).rev() {
        let idx = weight - w;
        let g = if idx >= 0 {
            digits.get(idx as usize).copied().unwrap_or(0)
        } else {
            0
        };
        if int.is_empty() {
            if w <= weight {
                int.push_str(&g.to_string());
            }
        } else {
            int.push_str(&format!("{g:04}"));
        }
    }
    if int.is_empty() || weight < 0 {
        int = "0".to_owned();
    }
    let mut frac = String::new();
    let mut w = -1i64;
    while frac.len() < dscale {
        let idx = weight - w;
        let g = if idx >= 0 {
            digits.get(idx as usize).copied().unwrap_or(0)
        } else {
            0
        };
        frac.push_str(&format!("{g:04}"));
        w -= 1;
    }
    frac.truncate(dscale);
    let value = if dscale > 0 {
        format!("{int}.{frac}")
    } else {
        int
    };
    let is_zero = value.bytes().all(|b| b == b'0' || b == b'.');
    Some(if sign == NUMERIC_NEG && !is_zero {
        format!("-{value}")
    } else {
        value
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeclaredType as T;

    fn round_trip(ty: DeclaredType, text: &str) {
        let bin = to_binary(ty, text).unwrap();
        assert_eq!(from_binary(ty, &bin).unwrap(), text, "{ty:?}");
    }

    #[test]
    fn every_declared_type_round_trips() {
        round_trip(T::Text, "héllo");
        round_trip(T::Varchar, "x");
        round_trip(T::Bytea, "\\x00ff10");
        round_trip(T::Int2, "-32768");
        round_trip(T::Int4, "123456");
        round_trip(T::Int8, "-9223372036854775808");
        round_trip(T::Float8, "3.14159");
        round_trip(T::Float8, "1e+300");
        round_trip(T::Bool, "t");
        round_trip(T::Date, "1999-12-31");
        round_trip(T::Date, "2024-02-29");
        round_trip(T::Timestamp, "2024-01-02 03:04:05.123456");
        round_trip(T::Timestamp, "1970-01-01 00:00:00");
        round_trip(T::Timestamptz, "2024-01-02 03:04:05+00");
        round_trip(T::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        round_trip(T::Jsonb, r#"{"a": [1, 2]}"#);
        for n in [
            "0",
            "1",
            "-1",
            "10000",
            "12345.678",
            "0.0001",
            "0.00012300",
            "-99999999.99",
            "NaN",
            "Infinity",
            "1.50",
            "0.00",
        ] {
            round_trip(T::Numeric, n);
        }
    }

    #[test]
    fn numeric_binary_matches_postgres_layout() {
        // SELECT numeric_send(12345.678) = 0003 0001 0000 0003 0001 0929 1a7c
        assert_eq!(
            to_binary(T::Numeric, "12345.678").unwrap(),
            vec![0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1a, 0x7c]
        );
        // date 2000-01-02 is day 1
        assert_eq!(to_binary(T::Date, "2000-01-02").unwrap(), vec![0, 0, 0, 1]);
    }

    #[test]
    fn infinite_dates_and_timestamps_round_trip_in_binary() {
        // date_send('infinity') = 7fffffff, timestamp_send('-infinity') = 8000000000000000.
        assert_eq!(
            to_binary(T::Date, "infinity").unwrap(),
            i32::MAX.to_be_bytes()
        );
        assert_eq!(
            to_binary(T::Date, "-infinity").unwrap(),
            i32::MIN.to_be_bytes()
        );
        assert_eq!(
            to_binary(T::Timestamp, "infinity").unwrap(),
            i64::MAX.to_be_bytes()
        );
        assert_eq!(
            to_binary(T::Timestamptz, "-infinity").unwrap(),
            i64::MIN.to_be_bytes()
        );
        for ty in [T::Date, T::Timestamp, T::Timestamptz] {
            round_trip(ty, "infinity");
            round_trip(ty, "-infinity");
        }
    }

    #[test]
    fn no_binary_date_or_timestamp_panics() {
        // Out of PostgreSQL's range (and of chrono's): refused, never a panic.
        for days in [i32::MAX - 1, i32::MIN + 1, 2_000_000_000, -2_000_000_000] {
            assert!(from_binary(T::Date, &days.to_be_bytes()).is_err(), "{days}");
        }
        for micros in [
            i64::MAX - 1,
            i64::MIN + 1,
            9_223_371_331_200_000_000,
            -(1 << 62),
        ] {
            assert!(from_binary(T::Timestamp, &micros.to_be_bytes()).is_err());
            assert!(from_binary(T::Timestamptz, &micros.to_be_bytes()).is_err());
        }
        // PostgreSQL's lower limit, 4714-11-24 BC, is kept; a microsecond before it is not.
        assert!(from_binary(T::Timestamp, &(-211_813_488_000_000_000i64).to_be_bytes()).is_ok());
        assert!(from_binary(T::Timestamp, &(-211_813_488_000_000_001i64).to_be_bytes()).is_err());
    }

    #[test]
    fn malformed_binary_is_an_error() {
        assert!(from_binary(T::Int4, &[1, 2]).is_err());
        assert!(from_binary(T::Bool, &[7]).is_err());
        assert!(from_binary(T::Numeric, &[0, 1, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(from_binary(T::Jsonb, &[2, b'1']).is_err());
    }
}
