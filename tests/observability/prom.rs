//! A strict parser of the Prometheus text format, for the tests.

use std::collections::{BTreeMap, HashMap};

/// One sample: metric name and its labels.
pub type Series = (String, BTreeMap<String, String>);
/// Every sample's value, and every metric's TYPE.
pub type Parsed = (HashMap<Series, f64>, HashMap<String, String>);

/// A strict parser of the Prometheus text format (the subset slb emits:
/// counters, gauges and histograms). Every sample needs a TYPE and HELP
/// line first (a histogram's `_bucket`, `_sum` and `_count` samples belong
/// to its name); a series may appear once.
pub fn parse_prometheus(text: &str) -> Result<Parsed, String> {
    let (mut samples, mut types, mut helps) = (HashMap::new(), HashMap::new(), HashMap::new());
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !n.starts_with(|c: char| c.is_ascii_digit())
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').ok_or(format!("bad HELP: {line}"))?;
            if !valid_name(name) || help.is_empty() || helps.insert(name.to_owned(), ()).is_some() {
                return Err(format!("bad or repeated HELP: {line}"));
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or(format!("bad TYPE: {line}"))?;
            if !valid_name(name) || !["counter", "gauge", "histogram"].contains(&kind) {
                return Err(format!("bad TYPE: {line}"));
            }
            if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                return Err(format!("repeated TYPE: {line}"));
            }
        } else if line.starts_with('#') {
            continue;
        } else {
            let (series, value) = parse_sample(line)?;
            if !valid_name(&series.0) {
                return Err(format!("bad metric name: {line}"));
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| series.0.strip_suffix(suffix))
                .find(|base| types.get(*base).is_some_and(|t| t == "histogram"))
                .unwrap_or(&series.0);
            if !types.contains_key(family) || !helps.contains_key(family) {
                return Err(format!("sample before its TYPE and HELP: {line}"));
            }
            if samples.insert(series, value).is_some() {
                return Err(format!("repeated series: {line}"));
            }
        }
    }
    Ok((samples, types))
}

fn parse_sample(line: &str) -> Result<(Series, f64), String> {
    let bad = || format!("bad sample: {line}");
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => {
            let (n, v) = line.split_once(' ').ok_or_else(bad)?;
            let v: f64 = v.parse().map_err(|_| bad())?;
            return Ok(((n.to_owned(), BTreeMap::new()), v));
        }
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            rest = r;
            break;
        }
        let (key, r) = rest.split_once("=\"").ok_or_else(bad)?;
        let mut value = String::new();
        let mut chars = r.char_indices();
        let end = loop {
            match chars.next().ok_or_else(bad)? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or_else(bad)?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    _ => return Err(bad()),
                },
                (_, c) => value.push(c),
            }
        };
        if labels.insert(key.to_owned(), value).is_some() {
            return Err(bad());
        }
        rest = &r[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    let v: f64 = rest
        .strip_prefix(' ')
        .ok_or_else(bad)?
        .parse()
        .map_err(|_| bad())?;
    Ok(((name.to_owned(), labels), v))
}

pub fn value(m: &HashMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    *m.get(&(name.to_owned(), labels.clone()))
        .unwrap_or_else(|| panic!("no series {name} {labels:?}"))
}
