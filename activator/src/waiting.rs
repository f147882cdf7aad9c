//! The waiting page for browsers (`activation.waitingPage`, opt-in): which requests are
//! page loads, and the page they get once they have waited `after` for a pod.
//!
//! A page load is a GET (or HEAD) that accepts `text/html` and is not a script's
//! request (`Sec-Fetch-Mode`, when the browser sends it, says `navigate`), nor an
//! upgrade. It gets 503 with `Retry-After` and `Refresh` and a page without scripts
//! whose `<meta http-equiv="refresh">` loads the same address again every
//! [`RELOAD_SECONDS`]: each reload is one more request held for `after`, and the
//! first one that finds a pod is answered by it, so the browser lands on the app.
//! Every other request keeps being held until a pod answers or the activation timeout.
//!
//! Must not: decide when a request waits (that is `admit`), or count anything.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, header};

/// Seconds between the page's reloads (its `Refresh` and `Retry-After`).
pub const RELOAD_SECONDS: u32 = 2;

/// One service's waiting page, rendered once when its spec changes.
#[derive(Debug, PartialEq)]
pub struct Page {
    /// How long a page load waits for a pod before it gets the page.
    pub after: Duration,
    pub html: Bytes,
}

impl Page {
    pub fn new(spec: &snooze_crds::WaitingPage) -> Self {
        Self {
            after: spec.after(),
            html: render(&spec.title, &spec.message).into(),
        }
    }
}

/// Whether a request is a browser's page load (see the module's comment).
pub fn is_page_load(method: &Method, headers: &HeaderMap) -> bool {
    if method != Method::GET && method != Method::HEAD {
        return false;
    }
    if headers.contains_key(header::UPGRADE) {
        return false;
    }
    let navigates = headers
        .get("sec-fetch-mode")
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"navigate"));
    navigates
        && headers.get_all(header::ACCEPT).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.split(';').next().unwrap_or("").trim() == "text/html")
            })
        })
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn render(title: &str, message: &str) -> String {
    let (title, message) = (escape(title), escape(message));
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{RELOAD_SECONDS}">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; display: flex; min-height: 90vh; align-items: center; justify-content: center; color: #222; background: #fafafa; }}
main {{ max-width: 32rem; text-align: center; }}
.dots::after {{ content: "..."; animation: d 1.5s steps(4, end) infinite; display: inline-block; overflow: hidden; vertical-align: bottom; width: 0; }}
@keyframes d {{ to {{ width: 1.2em; }} }}
</style>
</head>
<body>
<main id="snooze-waiting">
<h1>{title}<span class="dots"></span></h1>
<p>{message}</p>
</main>
</body>
</html>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_browser_navigation_is_a_page_load_and_the_rest_are_not() {
        let chrome =
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";
        assert!(is_page_load(
            &Method::GET,
            &headers(&[("accept", chrome), ("sec-fetch-mode", "navigate")])
        ));
        // Older browsers send no Sec-Fetch-Mode.
        assert!(is_page_load(&Method::GET, &headers(&[("accept", chrome)])));
        // curl, API clients, a script's fetch, a POST, a WebSocket.
        assert!(!is_page_load(&Method::GET, &headers(&[("accept", "*/*")])));
        assert!(!is_page_load(&Method::GET, &headers(&[])));
        assert!(!is_page_load(
            &Method::GET,
            &headers(&[("accept", chrome), ("sec-fetch-mode", "cors")])
        ));
        assert!(!is_page_load(
            &Method::POST,
            &headers(&[("accept", chrome)])
        ));
        assert!(!is_page_load(
            &Method::GET,
            &headers(&[("accept", chrome), ("upgrade", "websocket")])
        ));
        assert!(!is_page_load(
            &Method::GET,
            &headers(&[("accept", "application/json, text/htmlx")])
        ));
    }

    #[test]
    fn the_page_escapes_what_the_spec_says_and_reloads_itself() {
        let p = Page::new(&snooze_crds::WaitingPage {
            after: std::time::Duration::from_secs(1).into(),
            title: "Shop <b>".into(),
            message: "\"back\" & 'soon'</p><script>x()</script>".into(),
        });
        let html = std::str::from_utf8(&p.html).unwrap();
        assert!(html.contains("<title>Shop &lt;b&gt;</title>"), "{html}");
        assert!(html.contains("&quot;back&quot; &amp; &#39;soon&#39;&lt;/p&gt;&lt;script&gt;"));
        assert!(!html.contains("<script"));
        assert!(html.contains(r#"<meta http-equiv="refresh" content="2">"#));
        assert_eq!(p.after, Duration::from_secs(1));
    }
}
