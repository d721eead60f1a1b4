//! Reading what `--metrics-addr` serves: `/metrics` in the Prometheus text format, fetched over
//! plain HTTP and parsed strictly, so a test that reads a number also checks the format.
//!
//! The parser follows the text exposition format (version 0.0.4): `# HELP` and `# TYPE` lines,
//! and samples `name{label="value",...} value [timestamp]`. Every sample must belong to a family
//! declared by a `# TYPE` line before it (a histogram's `_bucket`, `_sum` and `_count` belong to
//! its family), no sample may appear twice, and values must be numbers (`+Inf`, `-Inf` and `NaN`
//! included). Anything else is an error naming the line, which is what a scraper would choke on.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::waiting::wait_until;

/// How long [`scrape`] retries while nothing answers at the address (the process may still be
/// starting).
const SCRAPE_BOUND: Duration = Duration::from_secs(120);

/// Samples by series, the name and labels exactly as the text writes them:
/// `jetci_results_total{status="failed"}` → 2.0, `jetci_queue_depth` → 0.0.
pub type Samples = HashMap<String, f64>;

/// Fetches `http://ADDR/metrics` and parses it with [`parse`]. Retries for up to two minutes
/// while nothing answers with `200 OK`; panics after that, or at once if the body is not valid
/// Prometheus text (the message names the line and shows the body).
pub fn scrape(addr: &str) -> Samples {
    let body = fetch(addr);
    parse(&body).unwrap_or_else(|e| panic!("{addr}/metrics is not Prometheus text: {e}\n{body}"))
}

/// The body of `GET /metrics` at `addr`, once it answers `200`.
fn fetch(addr: &str) -> String {
    let what = format!("metrics at http://{addr}/metrics");
    wait_until(&what, SCRAPE_BOUND, || {
        let mut stream = TcpStream::connect(addr).map_err(|e| format!("cannot connect: {e}"))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        let mut out = String::new();
        stream
            .read_to_string(&mut out)
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        match head.lines().next() {
            Some(status) if status.contains(" 200 ") => Ok(body.to_string()),
            Some(status) => Err(status.to_string()),
            None => Err("an empty answer".to_string()),
        }
    })
}

/// Parses Prometheus text into its samples; see the module's doc for what is checked.
pub fn parse(text: &str) -> Result<Samples, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Samples::new();
    for (n, line) in text.lines().enumerate() {
        let at = |what: String| format!("line {}: {what}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            match words.next() {
                Some("TYPE") => {
                    let name = words
                        .next()
                        .ok_or_else(|| at("TYPE without a name".into()))?;
                    check_name(name).map_err(at)?;
                    let kind = words
                        .next()
                        .ok_or_else(|| at("TYPE without a type".into()))?;
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(at(format!("unknown type {kind:?}")));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(at(format!("second TYPE line for {name}")));
                    }
                }
                Some("HELP") => {
                    let name = words
                        .next()
                        .ok_or_else(|| at("HELP without a name".into()))?;
                    check_name(name).map_err(at)?;
                }
                _ => {}
            }
            continue;
        }
        let (series, value) = split_sample(line).map_err(at)?;
        let name = series.split('{').next().unwrap_or(series);
        check_name(name).map_err(at)?;
        if !types.contains_key(family(name, &types)) {
            return Err(at(format!("sample of {name} before any TYPE line for it")));
        }
        if samples.insert(series.to_string(), value).is_some() {
            return Err(at(format!("second sample of {series}")));
        }
    }
    Ok(samples)
}

/// The family a sample name belongs to: a histogram's or summary's `_bucket`, `_sum` and
/// `_count` series belong to the name without the suffix.
fn family<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            ) {
                return base;
            }
        }
    }
    name
}

/// A metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("bad metric name {name:?}"))
    }
}

/// Splits `name{labels} value [timestamp]` into the series (`name{labels}`, checked) and the
/// value.
fn split_sample(line: &str) -> Result<(&str, f64), String> {
    let series_end = match line.find('{') {
        Some(open) if line[..open].find(' ').is_none() => {
            open + labels_len(&line[open..]).map_err(|e| format!("bad labels ({e})"))?
        }
        _ => line
            .find(' ')
            .ok_or_else(|| "a sample needs a value".to_string())?,
    };
    let (series, rest) = line.split_at(series_end);
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("a sample needs a value")?;
    let value: f64 = value
        .parse()
        .map_err(|_| format!("value {value:?} is not a number"))?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("timestamp {ts:?} is not an integer"))?;
    }
    if fields.next().is_some() {
        return Err("more than a value and a timestamp after the series".into());
    }
    Ok((series, value))
}

/// The length of `{name="value",...}` at the start of `s`, closing brace included. Label values
/// may hold `\\`, `\"` and `\n` escapes.
fn labels_len(s: &str) -> Result<usize, String> {
    let bytes = s.as_bytes();
    let mut i = 1;
    loop {
        while bytes.get(i) == Some(&b' ') {
            i += 1;
        }
        if bytes.get(i) == Some(&b'}') {
            return Ok(i + 1);
        }
        let start = i;
        while bytes
            .get(i)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
        {
            i += 1;
        }
        if i == start || bytes[start].is_ascii_digit() {
            return Err("a label needs a name".into());
        }
        if bytes.get(i) != Some(&b'=') || bytes.get(i + 1) != Some(&b'"') {
            return Err("a label needs =\"value\"".into());
        }
        i += 2;
        loop {
            match bytes.get(i) {
                None => return Err("unterminated label value".into()),
                Some(b'\\') => {
                    if !matches!(bytes.get(i + 1), Some(b'\\' | b'"' | b'n')) {
                        return Err("bad escape in a label value".into());
                    }
                    i += 2;
                }
                Some(b'"') => {
                    i += 1;
                    break;
                }
                Some(_) => i += 1,
            }
        }
        match bytes.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => return Ok(i + 1),
            _ => return Err("expected , or } after a label".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_exporter_writes() {
        let text = "# HELP jetci_results_total final results\n\
                    # TYPE jetci_results_total counter\n\
                    jetci_results_total{status=\"failed\"} 2\n\
                    jetci_results_total{status=\"pas sed\",x=\"a\\\"b\"} 1 1700000000000\n\
                    \n\
                    # TYPE jetci_job_duration_seconds histogram\n\
                    jetci_job_duration_seconds_bucket{le=\"+Inf\"} 3\n\
                    jetci_job_duration_seconds_sum 0.75\n\
                    jetci_job_duration_seconds_count 3\n\
                    # TYPE jetci_queue_depth gauge\n\
                    jetci_queue_depth NaN\n";
        let s = parse(text).unwrap();
        assert_eq!(s["jetci_results_total{status=\"failed\"}"], 2.0);
        assert_eq!(
            s["jetci_results_total{status=\"pas sed\",x=\"a\\\"b\"}"],
            1.0
        );
        assert_eq!(s["jetci_job_duration_seconds_count"], 3.0);
        assert!(s["jetci_queue_depth"].is_nan());
    }

    #[test]
    fn rejects_what_a_scraper_would() {
        for bad in [
            "jetci_x 1\n",                                    // no TYPE
            "# TYPE jetci_x counter\njetci_x\n",              // no value
            "# TYPE jetci_x counter\njetci_x one\n",          // not a number
            "# TYPE jetci_x counter\njetci_x{a=\"1} 1\n",     // unterminated label
            "# TYPE jetci_x counter\njetci_x{a=1} 1\n",       // unquoted label
            "# TYPE jetci_x counter\njetci_x 1\njetci_x 2\n", // twice
            "# TYPE jetci_x countr\njetci_x 1\n",             // unknown type
            "# TYPE 1x counter\n",                            // bad name
            "# TYPE jetci_x counter\njetci_x 1 2 3\n",        // trailing junk
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
