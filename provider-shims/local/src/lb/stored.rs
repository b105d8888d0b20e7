//! Load balancers as stored, decided without IO. A record names its backend list by digest and
//! each distinct list is one row of `lb_backends_v1`: the controller gives every load balancer
//! the same node list, so 1000 load balancers on 100 nodes store one list rather than 1000
//! copies, and a node change rewrites small records (schema 3).
//!
//! Schema-2 records carry their list inline; they are still read, and [`migration`] turns them
//! into schema-3 rows when the shim starts.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::alloc::LbRecord;
use super::spec::{Backend, LbSpec};
use crate::store::LbWrite;

/// A record row, either schema.
#[derive(Debug, Deserialize)]
struct StoredRecord {
    spec: LbSpec,
    ip: IpAddr,
    pool: Option<String>,
    /// Schema 3: the digest of the backend list.
    #[serde(default)]
    backends_id: Option<String>,
    /// Schema 2: the backend list itself.
    #[serde(default)]
    backends: Option<Vec<Backend>>,
}

/// A record row as this build writes it.
#[derive(Serialize)]
struct RecordRow<'a> {
    spec: &'a LbSpec,
    ip: IpAddr,
    pool: &'a Option<String>,
    backends_id: &'a str,
}

/// Why stored rows cannot be read: the table, the row and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state database {table} row {key:?} is unreadable ({error})")]
pub struct RowError {
    /// Table name.
    pub table: &'static str,
    /// Row key.
    pub key: String,
    /// What is wrong.
    pub error: String,
}

/// The digest naming `list` in `lb_backends_v1`: the first 128 bits of the SHA-256 of its
/// stored form, in hex.
pub fn list_id(list: &[Backend]) -> Result<Arc<str>, serde_json::Error> {
    let digest = ring::digest::digest(&ring::digest::SHA256, &encode_list(list)?);
    Ok(digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into())
}

/// The stored form of a backend list.
pub fn encode_list(list: &[Backend]) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(list)
}

/// The stored form of `record` (its list is stored apart, under `record.backends_id`).
pub fn encode_record(record: &LbRecord) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&RecordRow {
        spec: &record.spec,
        ip: record.ip,
        pool: &record.pool,
        backends_id: &record.backends_id,
    })
}

/// The records and holds decoded from their rows, and what [`migration`] needs to know.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Records by key.
    pub records: Vec<(String, LbRecord)>,
    /// Keys of records stored with their list inline (schema 2).
    pub inline: Vec<String>,
    /// Digests of the stored lists no record names.
    pub orphans: Vec<String>,
}

/// Decodes record rows against the stored lists; a row that cannot be read, or names a list
/// that is not stored, is an error (the shim refuses to start rather than hand its address to
/// another Service).
pub fn decode(
    records: &[(String, Vec<u8>)],
    lists: &[(String, Vec<u8>)],
) -> Result<Decoded, RowError> {
    let mut by_id: HashMap<&str, Arc<[Backend]>> = HashMap::with_capacity(lists.len());
    for (id, value) in lists {
        let list: Vec<Backend> = serde_json::from_slice(value).map_err(|e| RowError {
            table: "lb_backends_v1",
            key: id.clone(),
            error: e.to_string(),
        })?;
        by_id.insert(id.as_str(), list.into());
    }
    let mut named = HashSet::new();
    let mut decoded = Decoded::default();
    for (key, value) in records {
        let row_error = |error: String| RowError {
            table: "lb_records_v1",
            key: key.clone(),
            error,
        };
        let row: StoredRecord =
            serde_json::from_slice(value).map_err(|e| row_error(e.to_string()))?;
        let (backends_id, backends) = match (row.backends_id, row.backends) {
            (Some(id), _) => {
                let list = by_id.get(id.as_str()).cloned().ok_or_else(|| {
                    row_error(format!(
                        "it names backend list {id}, which lb_backends_v1 does not hold"
                    ))
                })?;
                named.insert(id.clone());
                (Arc::from(id), list)
            }
            (None, Some(list)) => {
                decoded.inline.push(key.clone());
                (
                    list_id(&list).map_err(|e| row_error(e.to_string()))?,
                    list.into(),
                )
            }
            (None, None) => return Err(row_error("it has no backend list".into())),
        };
        decoded.records.push((
            key.clone(),
            LbRecord {
                spec: row.spec,
                ip: row.ip,
                pool: row.pool,
                backends,
                backends_id,
            },
        ));
    }
    decoded.orphans = lists
        .iter()
        .map(|(id, _)| id)
        .filter(|id| !named.contains(*id))
        .cloned()
        .collect();
    Ok(decoded)
}

/// The start-up write bringing decoded rows to schema 3: each inline list stored once, its
/// records rewritten to name it, and lists nobody names removed. Empty when there is nothing
/// to do.
pub fn migration(decoded: &Decoded) -> Result<LbWrite, serde_json::Error> {
    let mut write = LbWrite {
        delete_backends: decoded.orphans.clone(),
        ..LbWrite::default()
    };
    let inline: HashSet<&str> = decoded.inline.iter().map(String::as_str).collect();
    let mut stored: HashSet<Arc<str>> = HashSet::new();
    for (key, record) in &decoded.records {
        if !inline.contains(key.as_str()) {
            continue;
        }
        if stored.insert(Arc::clone(&record.backends_id)) {
            write.put_backends.push((
                record.backends_id.to_string(),
                encode_list(&record.backends)?,
            ));
        }
        write
            .put_records
            .push((key.clone(), encode_record(record)?));
    }
    Ok(write)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<Backend> {
        (0..n)
            .map(|i| Backend {
                node: format!("node-{i}"),
                ip: format!("10.0.0.{}", i + 1).parse().unwrap(),
            })
            .collect()
    }

    fn record(name: &str, list: &[Backend]) -> LbRecord {
        LbRecord {
            backends: list.to_vec().into(),
            backends_id: list_id(list).unwrap(),
            ..LbRecord::example(name, "127.0.100.1")
        }
    }

    /// A schema-2 row: the record with its list inline.
    fn schema_2_row(record: &LbRecord) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "spec": record.spec,
            "ip": record.ip,
            "pool": record.pool,
            "backends": record.backends,
        }))
        .unwrap()
    }

    #[test]
    fn the_digest_depends_on_the_list_alone() {
        assert_eq!(
            list_id(&backends(3)).unwrap(),
            list_id(&backends(3)).unwrap()
        );
        assert_ne!(
            list_id(&backends(3)).unwrap(),
            list_id(&backends(4)).unwrap()
        );
        assert_eq!(list_id(&backends(3)).unwrap().len(), 32);
    }

    #[test]
    fn a_record_names_its_list_and_reads_back_whole() {
        let list = backends(100);
        let record = record("web", &list);
        let row = encode_record(&record).unwrap();
        // The row is small: the list is stored apart.
        assert!(row.len() < 600, "{} bytes", row.len());
        let decoded = decode(
            &[("c1/uid-web".into(), row)],
            &[(record.backends_id.to_string(), encode_list(&list).unwrap())],
        )
        .unwrap();
        assert_eq!(decoded.records, vec![("c1/uid-web".into(), record)]);
        assert!(decoded.inline.is_empty() && decoded.orphans.is_empty());
    }

    #[test]
    fn a_record_naming_a_missing_list_is_refused_with_its_key() {
        let record = record("web", &backends(2));
        let err = decode(
            &[("c1/uid-web".into(), encode_record(&record).unwrap())],
            &[],
        )
        .unwrap_err();
        assert_eq!(err.table, "lb_records_v1");
        assert_eq!(err.key, "c1/uid-web");
        assert!(err.error.contains(&*record.backends_id), "{err}");
    }

    #[test]
    fn schema_2_rows_are_read_and_migrated_once_per_list() {
        let list = backends(5);
        let (a, b) = (record("a", &list), record("b", &list));
        let decoded = decode(
            &[
                ("c1/uid-a".into(), schema_2_row(&a)),
                ("c1/uid-b".into(), schema_2_row(&b)),
            ],
            &[("stale".into(), encode_list(&backends(1)).unwrap())],
        )
        .unwrap();
        assert_eq!(decoded.records.len(), 2);
        assert_eq!(decoded.records[0].1, a);
        assert_eq!(decoded.orphans, vec!["stale".to_string()]);

        let write = migration(&decoded).unwrap();
        assert_eq!(
            write.put_backends,
            vec![(a.backends_id.to_string(), encode_list(&list).unwrap())]
        );
        assert_eq!(write.put_records.len(), 2);
        assert_eq!(write.delete_backends, vec!["stale".to_string()]);

        // After the migration the rows read back as schema 3, with nothing left to do.
        let again = decode(&write.put_records, &write.put_backends).unwrap();
        assert!(again.inline.is_empty() && again.orphans.is_empty());
        assert!(migration(&again).unwrap().is_empty());
    }
}
