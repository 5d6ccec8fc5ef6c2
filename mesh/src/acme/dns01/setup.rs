//! `DNS_SETUP_MODE` at run time: the dstack records of a domain as the operator must create
//! them, and whether every DoH resolver sees each one (dstack-ingress's rules: a TXT or CAA
//! value exactly; the gateway alias as a CNAME to it, or as addresses shared with it, for
//! providers that flatten).

use super::{doh::Doh, webhook::Required, Data, Record, Rtype, Wanted};

/// One required record and what the resolvers showed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordCheck {
    /// The record.
    #[serde(flatten)]
    pub record: Required,
    /// Every resolver that answered sees it.
    pub visible: bool,
    /// What was seen instead, when not visible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen: Option<String>,
}

impl RecordCheck {
    /// `record`, not looked at yet.
    pub fn pending(record: &Required) -> Self {
        Self {
            record: record.clone(),
            visible: false,
            seen: None,
        }
    }
}

/// The records the operator must create, from the wanted set (what cannot be had is logged by
/// the caller, not asked for).
pub fn required(wanted: &[Wanted]) -> Vec<Required> {
    wanted
        .iter()
        .filter_map(|w| match w {
            Wanted::Record {
                record,
                note,
                alias,
                ..
            } => Some(Required {
                rtype: record.data.rtype().as_str().to_owned(),
                name: record.name.clone(),
                value: presentation(&record.data),
                note: (*note).to_owned(),
                exact: !alias,
            }),
            Wanted::Skipped(_) => None,
        })
        .collect()
}

/// A value as a zone file (and an operator's DNS console) writes it.
fn presentation(data: &Data) -> String {
    match data {
        Data::Txt(v) => v.clone(),
        Data::Cname(t) => t.clone(),
        Data::Caa {
            critical,
            tag,
            value,
        } => format!("{} {tag} \"{value}\"", if *critical { 128 } else { 0 }),
        Data::Other(_, v) => v.clone(),
    }
}

/// The lines dstack-mesh logs and shows for `domain`'s records.
pub fn describe(domain: &str, records: &[Required]) -> String {
    let mut out = format!(
        "DNS records required for {domain} (no DNS credentials in this CVM: create them; issuance waits until public resolvers see them):"
    );
    for r in records {
        out.push_str(&format!(
            "\n  {:<5} {} -> {}  ({})",
            r.rtype, r.name, r.value, r.note
        ));
    }
    out
}

/// One look at every record through every resolver.
pub async fn look(doh: &Doh, resolvers: &[String], wanted: &[Wanted]) -> Vec<RecordCheck> {
    let mut out = Vec::new();
    let records = required(wanted);
    let wanted = wanted.iter().filter_map(|w| match w {
        Wanted::Record { record, alias, .. } => Some((record, *alias)),
        Wanted::Skipped(_) => None,
    });
    for ((record, alias), required) in wanted.zip(records) {
        let seen = match (&record.data, alias) {
            (Data::Cname(target), true) => alias_seen(doh, resolvers, record, target).await,
            _ => exact_seen(doh, resolvers, record).await,
        };
        out.push(RecordCheck {
            record: required,
            visible: seen.is_ok(),
            seen: seen.err(),
        });
    }
    out
}

/// Every resolver that answers has `want` (one that fails is skipped; none answering is
/// itself a miss).
async fn exact_seen(doh: &Doh, resolvers: &[String], want: &Record) -> Result<(), String> {
    let rtype = want.data.rtype();
    let mut answered = 0;
    let mut errors = Vec::new();
    for resolver in resolvers {
        match doh.query(resolver, &want.name, rtype).await {
            Ok(answer) => {
                answered += 1;
                let values: Vec<&Data> = answer
                    .records
                    .iter()
                    .map(|r| &r.data)
                    .filter(|d| d.rtype() == rtype)
                    .collect();
                if !values.iter().any(|d| d.same(&want.data)) {
                    return Err(match values.is_empty() {
                        true => format!("{resolver}: none"),
                        false => format!(
                            "{resolver}: {}",
                            values
                                .iter()
                                .map(|d| presentation(d))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    });
                }
            }
            Err(e) => errors.push(format!("{resolver}: {e}")),
        }
    }
    match answered {
        0 => Err(format!("no resolver answered ({})", errors.join("; "))),
        _ => Ok(()),
    }
}

/// At every resolver that answers, the name is a CNAME to the gateway, or (a provider that
/// flattens) its addresses are the gateway's: a resolver that still sees something else
/// (an old gateway, a cache not yet expired) is a miss, named with what it saw.
async fn alias_seen(
    doh: &Doh,
    resolvers: &[String],
    want: &Record,
    target: &str,
) -> Result<(), String> {
    let mut answered = 0;
    let mut errors = Vec::new();
    for resolver in resolvers {
        match alias_at(doh, resolver, want, target).await {
            Ok(Ok(())) => answered += 1,
            Ok(Err(seen)) => return Err(format!("{resolver}: {seen}")),
            Err(e) => errors.push(format!("{resolver}: {e}")),
        }
    }
    match answered {
        0 => Err(format!("no resolver answered ({})", errors.join("; "))),
        _ => Ok(()),
    }
}

/// [`alias_seen`] at one resolver: whether it sees the alias (else what it sees instead), or
/// why it did not answer.
async fn alias_at(
    doh: &Doh,
    resolver: &str,
    want: &Record,
    target: &str,
) -> Result<Result<(), String>, String> {
    let answer = doh
        .query(resolver, &want.name, Rtype::Cname)
        .await
        .map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    for r in &answer.records {
        if let Data::Cname(t) = &r.data {
            if r.name == want.name && t.eq_ignore_ascii_case(target) {
                return Ok(Ok(()));
            }
            seen.push(format!("CNAME {t}"));
        }
    }
    // Flattened: the name's addresses overlap the gateway's.
    for rtype in [Rtype::A, Rtype::Aaaa] {
        let (Ok(ours), Ok(gateway)) = (
            doh.query(resolver, &want.name, rtype).await,
            doh.query(resolver, target, rtype).await,
        ) else {
            continue;
        };
        let addresses = |a: &super::doh::Answer| -> Vec<String> {
            a.records
                .iter()
                .filter_map(|r| match &r.data {
                    Data::Other(t, v) if *t == rtype => Some(v.clone()),
                    _ => None,
                })
                .collect()
        };
        let (ours, gateway) = (addresses(&ours), addresses(&gateway));
        if ours.iter().any(|a| gateway.contains(a)) {
            return Ok(Ok(()));
        }
        if !ours.is_empty() {
            seen.push(format!("{} {}", rtype.as_str(), ours.join(" ")));
        }
    }
    Ok(Err(match seen.is_empty() {
        true => "none".to_owned(),
        false => seen.join(", "),
    }))
}
