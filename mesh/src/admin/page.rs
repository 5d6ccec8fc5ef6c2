//! The status page at `/` on the admin port: the identity, the mesh route and every public
//! domain with a status pill, issuer, expiry and days left; each row opens to its details.
//! Rendered here from the same [`Routes`] value `/routes` serves, so page and data never
//! drift; no external asset; readable on a phone; refreshes itself every 10 s.

use std::{fmt::Write as _, time::SystemTime};

use super::Routes;
use crate::acme::{CertStatus, Status};

/// Days left under which the expiry shows as a warning.
const WARN_DAYS: f64 = 30.0;
/// Days left under which it shows as danger.
const DANGER_DAYS: f64 = 7.0;
/// Domains on one page of the status page.
pub const PER_PAGE: usize = 100;

/// Which domains the page shows: those matching `q` (in a name, the state, the source or the
/// last error), one page of them, the ones needing someone first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// The search, as typed.
    pub q: String,
    /// The page, from 1.
    pub page: usize,
}

impl View {
    /// From the page's query string (`?q=...&page=N`).
    pub fn from_query(query: Option<&str>) -> Self {
        let mut view = Self {
            q: String::new(),
            page: 1,
        };
        for pair in query.unwrap_or_default().split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = ratls::quote::percent_decode(&v.replace('+', " ")).unwrap_or_default();
            match k {
                "q" => view.q = v.trim().chars().take(200).collect(),
                "page" => view.page = v.parse().unwrap_or(1).max(1),
                _ => {}
            }
        }
        view
    }

    fn matches(&self, d: &CertStatus) -> bool {
        let q = self.q.to_ascii_lowercase();
        q.is_empty()
            || d.names.iter().any(|n| n.contains(&q))
            || status_word(d.status) == q
            || d.source
                .as_deref()
                .is_some_and(|s| s.to_ascii_lowercase().contains(&q))
            || [&d.last_error, &d.site_probe]
                .iter()
                .filter_map(|t| t.as_deref())
                .any(|t| t.to_ascii_lowercase().contains(&q))
    }

    /// A link to page `page` of this search.
    fn link(&self, page: usize) -> String {
        let mut q = String::new();
        for b in self.q.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => q.push(b as char),
                _ => q.push_str(&format!("%{b:02X}")),
            }
        }
        format!("?q={q}&amp;page={page}")
    }
}

/// Whether a domain needs someone: shown first.
fn needs_attention(d: &CertStatus) -> bool {
    d.expired || d.not_after.is_none() || matches!(d.status, Status::Failed | Status::DnsMoved)
}

const STYLE: &str = r#"
:root{--fg:#1d2430;--muted:#5c6675;--line:#e3e7ee;--bg:#f7f8fa;--card:#fff;
--ok:#1a7f37;--okbg:#dcf5e3;--info:#0a5bd3;--infobg:#dde9fb;--warn:#8a5a00;--warnbg:#fdf0d0;
--bad:#b42318;--badbg:#fde4e1;--idle:#4b5563;--idlebg:#eceef2}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header,main,footer{max-width:1100px;margin:0 auto;padding:16px 20px}
header h1{font-size:20px;margin:0 0 6px}
.meta{color:var(--muted);display:flex;flex-wrap:wrap;gap:6px 18px}
code{font:13px ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;margin:0 0 18px;overflow:hidden}
section h2{font-size:15px;margin:0;padding:12px 16px;border-bottom:1px solid var(--line)}
table{width:100%;border-collapse:collapse}
th,td{text-align:left;padding:10px 16px;border-bottom:1px solid var(--line);vertical-align:top}
th,.nw{white-space:nowrap}
th{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:var(--muted);font-weight:600}
tr:last-child td{border-bottom:0}
.pill{display:inline-block;padding:2px 10px;border-radius:999px;font-size:12px;font-weight:600}
.pill-valid{color:var(--ok);background:var(--okbg)}
.pill-renewing,.pill-issuing{color:var(--info);background:var(--infobg)}
.pill-pending{color:var(--idle);background:var(--idlebg)}
.pill-failed{color:var(--bad);background:var(--badbg)}
.pill-dns_moved{color:var(--bad);background:var(--badbg)}
.days-warn{color:var(--warn);font-weight:600}
.days-danger{color:var(--bad);font-weight:700}
summary{cursor:pointer;font-weight:600}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;margin:10px 0 2px;font-size:13px}
dt{color:var(--muted)}dd{margin:0;word-break:break-word}
.error{color:var(--bad)}
.more{color:var(--muted);font-weight:400}
.empty{padding:14px 16px;color:var(--muted)}
.search{display:flex;flex-wrap:wrap;gap:8px 14px;align-items:center;padding:10px 16px;border-bottom:1px solid var(--line)}
.search input{flex:1 1 260px;font:inherit;padding:6px 10px;border:1px solid var(--line);border-radius:8px}
footer{color:var(--muted);font-size:13px}
a{color:var(--info)}
@media (max-width:640px){
 header,main,footer{padding:12px}
 thead{display:none}
 table,tbody,tr,td{display:block;width:100%}
 tr{border-bottom:1px solid var(--line);padding:6px 0}
 td{border:0;padding:4px 14px;display:flex;justify-content:space-between;gap:12px}
 td::before{content:attr(data-label);color:var(--muted);font-size:12px;text-transform:uppercase}
 td.host{display:block}td.host::before{content:none}
}
"#;

// Swaps in a fresh <main> every 10 s, keeping the rows that were open.
const SCRIPT: &str = r#"
setInterval(async()=>{try{
 if(document.activeElement&&document.activeElement.name==="q")return;
 const r=await fetch(location.pathname+location.search,{cache:"no-store"});if(!r.ok)return;
 const d=new DOMParser().parseFromString(await r.text(),"text/html");
 const open=[...document.querySelectorAll("details[open]")].map(e=>e.id);
 const m=d.getElementById("main");if(!m)return;
 document.getElementById("main").replaceWith(m);
 for(const id of open){const e=document.getElementById(id);if(e)e.open=true}
 const u=d.getElementById("updated");if(u)document.getElementById("updated").replaceWith(u);
}catch(e){}},10000);
"#;

/// Text safe inside HTML elements and attributes.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

fn date(unix: i64) -> String {
    // RFC 3339 to the minute: the seconds only clutter a table.
    let full = crate::clock::rfc3339(unix);
    full.get(..16).map(|s| s.replace('T', " ")).unwrap_or(full)
}

/// The pill's word (also its class suffix).
pub fn status_word(s: Status) -> &'static str {
    match s {
        Status::Pending => "pending",
        Status::Issuing => "issuing",
        Status::Valid => "valid",
        Status::Renewing => "renewing",
        Status::Failed => "failed",
        Status::DnsMoved => "dns_moved",
    }
}

/// Days left and the class they show with.
fn days_left(not_after: Option<u64>, now: i64) -> (String, &'static str) {
    let Some(t) = not_after else {
        return ("–".into(), "");
    };
    let days = (t as f64 - now as f64) / 86400.0;
    let class = if days < DANGER_DAYS {
        "days-danger"
    } else if days < WARN_DAYS {
        "days-warn"
    } else {
        ""
    };
    match days < 0.0 {
        true => ("expired".into(), "days-danger"),
        false => (format!("{days:.1}"), class),
    }
}

fn domain_row(out: &mut String, i: usize, d: &CertStatus, now: i64) {
    let word = status_word(d.status);
    let (days, days_class) = days_left(d.not_after, now);
    let expires = d
        .not_after
        .map_or("–".into(), |t| date(i64::try_from(t).unwrap_or(i64::MAX)));
    let others = d.names.len().saturating_sub(1);
    let more = match others {
        0 => String::new(),
        n => format!(" <span class=\"more\">+{n}</span>"),
    };
    let _ = write!(
        out,
        "<tr class=\"route\" data-domain=\"{domain}\" data-status=\"{word}\">\
         <td class=\"host\" data-label=\"Host\"><details id=\"d{i}\"{open}><summary>{domain}{more}</summary><dl>",
        domain = esc(&d.domain),
        // A failing route shows why without a click.
        open = if d.last_error.is_some() { " open" } else { "" },
    );
    let mut item = |k: &str, v: &str, class: &str| {
        let _ = write!(out, "<dt>{k}</dt><dd class=\"{class}\">{}</dd>", esc(v));
    };
    item("names", &d.names.join(", "), "");
    item(
        "backend",
        &format!("{} ({:?})", d.backend, d.mode).to_lowercase(),
        "",
    );
    if let Some(by) = &d.issued_by {
        item("issued by", by, "");
    }
    if let Some(t) = d.renew_at {
        item("renews", &date(i64::try_from(t).unwrap_or(i64::MAX)), "");
    }
    if let Some(w) = &d.renewal_info {
        item("CA's renewal window", w, "");
    }
    if let Some(e) = &d.last_error {
        item("last error", e, "error");
    }
    if let Some(t) = d.next_attempt {
        item(
            "next attempt",
            &date(i64::try_from(t).unwrap_or(i64::MAX)),
            "",
        );
    }
    if let Some(r) = &d.dns_records {
        let class = if r.starts_with("error") { "error" } else { "" };
        item("DNS records", r, class);
    }
    if let Some(h) = &d.dns_health {
        let class = if h.starts_with("moved") { "error" } else { "" };
        item("DNS", h, class);
    }
    if let Some(p) = &d.site_probe {
        let class = if p.starts_with("failed") { "error" } else { "" };
        item("site probe", p, class);
    }
    for r in d.dns_setup.iter().flatten() {
        // Each record the operator must create (DNS_SETUP_MODE), and whether it is seen.
        let (state, class) = match (r.visible, &r.seen) {
            (true, _) => ("visible".to_owned(), ""),
            (false, Some(seen)) => (format!("not yet (seen: {seen})"), "error"),
            (false, None) => ("not checked yet".to_owned(), ""),
        };
        item(
            "create DNS record",
            &format!(
                "{} {} → {} — {state}",
                r.record.rtype, r.record.name, r.record.value
            ),
            class,
        );
    }
    if let Some(f) = &d.fleet {
        let class = if f == "shared" { "" } else { "error" };
        item("fleet store", f, class);
    }
    let _ = write!(
        out,
        "</dl></details></td>\
         <td data-label=\"Status\"><span class=\"pill pill-{word}\">{word}</span></td>\
         <td data-label=\"Issuer\">{issuer}</td>\
         <td data-label=\"Expires\" class=\"nw\">{expires}</td>\
         <td data-label=\"Days left\" class=\"nw {days_class}\">{days}</td></tr>",
        issuer = esc(&d.issuer),
    );
}

/// The whole page, its domains as `view` says.
pub fn render(routes: &Routes, now: SystemTime, view: &View) -> String {
    let now = crate::clock::unix(now);
    let id = &routes.identity;
    let mut out = String::with_capacity(8192);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>dstack-mesh · {name}</title><style>{STYLE}</style></head><body>\
         <header><h1>dstack-mesh{titled}</h1><div class=\"meta\">\
         <span>app <code>{app}</code></span>",
        name = esc(if id.app_name.is_empty() {
            &id.app_id
        } else {
            &id.app_name
        }),
        titled = match id.app_name.is_empty() {
            true => String::new(),
            false => format!(" · {}", esc(&id.app_name)),
        },
        app = esc(&id.app_id),
    );
    if let Some(instance) = &id.instance_id {
        let _ = write!(out, "<span>instance <code>{}</code></span>", esc(instance));
    }
    // The identity lives a day and rotates at two thirds: only an expired one is alarming.
    let (days, class) = match days_left(u64::try_from(id.not_after).ok(), now) {
        (days, _) if id.not_after > now => (days, ""),
        (days, class) => (days, class),
    };
    let _ = write!(
        out,
        "<span>identity expires {} (<span class=\"{class}\">{days}</span> days){}</span>\
         <span id=\"peers\">peers seen: {} inbound, {} outbound</span></div></header><main id=\"main\">",
        date(id.not_after),
        match id.attestation {
            ratls::AttestationStatus::KeyBound => "; attestation: report data binds the key, quote not verified",
            ratls::AttestationStatus::QuoteVerified => "; attestation: quote verified",
            ratls::AttestationStatus::Absent => "",
        },
        routes.peers.inbound,
        routes.peers.outbound,
    );
    out.push_str("<section><h2>Mesh</h2>");
    match &routes.mesh {
        Some(m) => {
            let _ = write!(
                out,
                "<table><thead><tr><th>Listen</th><th>Backend</th><th>Allowed apps</th></tr></thead><tbody><tr>\
                 <td data-label=\"Listen\"><code>{}</code></td><td data-label=\"Backend\"><code>{}</code></td>\
                 <td data-label=\"Allowed\"><code>{}</code>{}</td></tr></tbody></table>",
                esc(&m.listen),
                esc(&m.backend),
                esc(&m.allowed()),
                if m.require_attestation { " · attestation required" } else { "" },
            );
        }
        None => out.push_str("<p class=\"empty\">The inbound listener is off.</p>"),
    }
    if !routes.tcp.is_empty() || !routes.tunnels.is_empty() {
        out.push_str(
            "</section><section><h2>TCP services and tunnels</h2><table><thead><tr><th>Name</th>\
             <th>Listen</th><th>To</th><th>Open</th></tr></thead><tbody>",
        );
        for t in &routes.tcp {
            let _ = write!(
                out,
                "<tr><td data-label=\"Name\">service <code>{}</code></td><td data-label=\"Listen\"><code>{}</code></td>\
                 <td data-label=\"To\"><code>{}</code> · allowed: <code>{}</code></td><td data-label=\"Open\">{}</td></tr>",
                esc(&t.name),
                esc(&t.listen),
                esc(&t.backend),
                esc(&t.allowed),
                t.open,
            );
        }
        for t in &routes.tunnels {
            let _ = write!(
                out,
                "<tr><td data-label=\"Name\">tunnel <code>{}</code></td><td data-label=\"Listen\"><code>{}</code></td>\
                 <td data-label=\"To\"><code>{}</code></td><td data-label=\"Open\">{}</td></tr>",
                esc(&t.name),
                esc(&t.listen),
                esc(&t.target),
                t.open,
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section><section><h2>Public domains</h2>");
    if routes.domains.is_empty() {
        out.push_str("<p class=\"empty\">No public domains are configured.</p>");
    } else {
        let mut shown: Vec<(usize, &CertStatus)> = routes
            .domains
            .iter()
            .enumerate()
            .filter(|(_, d)| view.matches(d))
            .collect();
        // Stable: the ones needing someone first, each group in its own order.
        shown.sort_by_key(|(_, d)| !needs_attention(d));
        let pages = shown.len().div_ceil(PER_PAGE).max(1);
        let page = view.page.clamp(1, pages);
        let _ = write!(
            out,
            "<form class=\"search\" method=\"get\"><input name=\"q\" value=\"{q}\" \
             placeholder=\"search names, states (failed, dns_moved), sources, errors\" aria-label=\"search\">\
             <span class=\"more\">{n} of {total} · page {page} of {pages}{prev}{next}</span></form>",
            q = esc(&view.q),
            n = shown.len(),
            total = routes.domains.len(),
            prev = match page > 1 {
                true => format!(" · <a href=\"{}\">previous</a>", view.link(page - 1)),
                false => String::new(),
            },
            next = match page < pages {
                true => format!(" · <a href=\"{}\">next</a>", view.link(page + 1)),
                false => String::new(),
            },
        );
        out.push_str(
            "<table class=\"routes\"><thead><tr><th>Host</th><th>Status</th><th>Issuer</th>\
             <th>Expires</th><th>Days left</th></tr></thead><tbody>",
        );
        for (i, d) in shown.iter().skip((page - 1) * PER_PAGE).take(PER_PAGE) {
            domain_row(&mut out, *i, d, now);
        }
        out.push_str("</tbody></table>");
    }
    let _ = write!(
        out,
        "</section></main><footer><span id=\"updated\">updated {} UTC</span> · refreshes every 10 s · \
         <a href=\"/routes\">JSON</a> · <a href=\"/metrics\">metrics</a></footer>\
         <script>{SCRIPT}</script></body></html>",
        date(now)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{IdentityView, PeerCounts};

    fn status(
        domain: &str,
        status: Status,
        not_after: Option<u64>,
        error: Option<&str>,
    ) -> CertStatus {
        serde_json::from_value(serde_json::json!({
            "domain": domain, "names": [domain], "status": status, "issuer": "internal-ca",
            "issued_by": null, "mode": "http", "backend": "app:80", "not_before": null,
            "not_after": not_after, "renew_at": null, "serial": null, "expired": false,
            "last_error": error, "next_attempt": null, "consecutive_failures": 0,
            "failures_total": 0, "issued_total": 0,
        }))
        .unwrap()
    }

    #[test]
    fn thousands_of_domains_page_and_search_with_trouble_first() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let mut domains: Vec<CertStatus> = (0..250)
            .map(|i| {
                status(
                    &format!("c{i:03}.example"),
                    Status::Valid,
                    Some(1_900_000_000),
                    None,
                )
            })
            .collect();
        domains[200] = status("c200.example", Status::Failed, None, Some("CAA forbids"));
        domains[201].status = Status::DnsMoved;
        let routes = Routes {
            identity: IdentityView {
                app_id: "ab".repeat(20),
                instance_id: None,
                app_name: String::new(),
                not_after: 1_800_000_000 + 3600,
                attestation: ratls::AttestationStatus::Absent,
            },
            mesh: None,
            domains,
            peers: PeerCounts::default(),
            tcp: Vec::new(),
            tunnels: Vec::new(),
        };
        let rows = |html: &str| html.matches("data-label=\"Status\"").count();
        let first = render(&routes, now, &View::from_query(None));
        assert_eq!(rows(&first), PER_PAGE);
        assert!(first.contains("250 of 250 · page 1 of 3"));
        // The two in trouble lead the first page.
        let failed = first.find("c200.example").unwrap();
        assert!(failed < first.find("c000.example").unwrap());
        assert!(first.find("c201.example").unwrap() < first.find("c000.example").unwrap());
        let last = render(&routes, now, &View::from_query(Some("page=3")));
        assert_eq!(rows(&last), 50);
        assert!(last.contains("?q=&amp;page=2\">previous</a>") && !last.contains(">next<"));
        let beyond = render(&routes, now, &View::from_query(Some("page=99")));
        assert!(beyond.contains("page 3 of 3"));
        let moved = render(&routes, now, &View::from_query(Some("q=dns_moved")));
        assert_eq!(rows(&moved), 1);
        let by_error = render(&routes, now, &View::from_query(Some("q=CAA+forbids")));
        assert!(by_error.contains("1 of 250") && by_error.contains("c200.example"));
        let by_name = render(&routes, now, &View::from_query(Some("q=c12")));
        assert!(by_name.contains("10 of 250"), "c120..c129");
        let hostile = render(&routes, now, &View::from_query(Some("q=%3Cscript%3E")));
        assert!(!hostile.contains("<script>x") && hostile.contains("value=\"&lt;script&gt;\""));
    }

    #[test]
    fn rows_pills_days_and_escaping() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let day = 86400;
        let routes = Routes {
            identity: IdentityView {
                app_id: "ab".repeat(20),
                instance_id: None,
                app_name: "<shop>".into(),
                not_after: 1_800_000_000 + 3600,
                attestation: ratls::AttestationStatus::Absent,
            },
            mesh: None,
            domains: vec![
                status(
                    "ok.example",
                    Status::Valid,
                    Some(1_800_000_000 + 60 * day),
                    None,
                ),
                status(
                    "soon.example",
                    Status::Renewing,
                    Some(1_800_000_000 + 20 * day),
                    None,
                ),
                status(
                    "late.example",
                    Status::Valid,
                    Some(1_800_000_000 + 3 * day),
                    None,
                ),
                status("down.example", Status::Failed, None, Some("CA said <no>")),
                {
                    // A domain whose records the operator makes (DNS_SETUP_MODE): each to
                    // create, and whether the resolvers see it.
                    let mut d = status("byhand.example", Status::Issuing, None, None);
                    let row =
                        |rtype: &str, name: &str, value: &str, visible, seen: Option<&str>| {
                            serde_json::from_value(serde_json::json!({
                                "type": rtype, "name": name, "value": value, "note": "",
                                "exact": true, "visible": visible, "seen": seen,
                            }))
                            .unwrap()
                        };
                    d.dns_setup = Some(vec![
                        row("CNAME", "byhand.example", "gw.example.net", true, None),
                        row(
                            "TXT",
                            "_acme-challenge.byhand.example",
                            "tok<en>",
                            false,
                            Some("none"),
                        ),
                    ]);
                    d
                },
            ],
            peers: PeerCounts::default(),
            tcp: vec![crate::admin::TcpRoute {
                name: "redis".into(),
                listen: "0.0.0.0:6379".into(),
                backend: "<redis>:6379".into(),
                allowed: "any app under the trust anchors".into(),
                open: 2,
            }],
            tunnels: vec![crate::admin::TunnelRoute {
                name: "db".into(),
                listen: "127.0.0.1:5432".into(),
                target: format!("{}:5432", "cd".repeat(20)),
                open: 0,
            }],
        };
        let html = render(&routes, now, &View::default());
        assert!(html.contains("TCP services and tunnels"));
        assert!(html.contains("service <code>redis</code>") && html.contains("&lt;redis&gt;:6379"));
        assert!(html.contains("tunnel <code>db</code>"));
        assert!(html.contains("<span class=\"pill pill-valid\">valid</span>"));
        assert!(html.contains("pill pill-renewing"));
        assert!(html.contains("<span class=\"pill pill-failed\">failed</span>"));
        assert!(html.contains("class=\"nw days-warn\">20.0<"), "{html}");
        assert!(html.contains("class=\"nw days-danger\">3.0<"));
        assert!(html.contains("CA said &lt;no&gt;") && !html.contains("<no>"));
        assert!(html.contains("&lt;shop&gt;") && !html.contains("<shop>"));
        assert!(html.contains("create DNS record"), "{html}");
        assert!(html.contains("CNAME byhand.example → gw.example.net — visible"));
        assert!(html
            .contains("TXT _acme-challenge.byhand.example → tok&lt;en&gt; — not yet (seen: none)"));
        // Nothing is loaded from elsewhere.
        assert!(!html.contains("http://") && !html.contains("https://") && !html.contains(" src="));
    }
}
