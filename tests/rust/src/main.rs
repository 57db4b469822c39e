//! Reads bincode payloads (one file per argument) with the definitions from
//! docs/replication-message.md, included below at build time, and prints what it read.

include!(concat!(env!("OUT_DIR"), "/definitions.rs"));

fn show(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Unchanged => "unchanged".into(),
        Value::Text(t) => format!("text:{t}"),
        Value::Binary(b) => format!("binary:{}", b.len()),
    }
}

fn row(r: &Option<Row>) -> String {
    match r {
        None => "-".into(),
        Some(Row(values)) => values.iter().map(show).collect::<Vec<_>>().join("|"),
    }
}

fn main() {
    for path in std::env::args().skip(1) {
        let data = std::fs::read(&path).expect("read payload");
        let txn: Transaction = bincode::deserialize(&data).expect("deserialize payload");
        println!("txn {} {} {} {} {:?}", txn.xid, txn.lsn, txn.end_lsn, txn.commit_time_us, txn.origin);
        for rel in &txn.relations {
            let cols: Vec<String> =
                rel.columns.iter().map(|c| format!("{}:{}:{}", c.name, c.type_oid, c.is_key)).collect();
            println!("relation {}.{} {}", rel.schema, rel.table, cols.join(","));
        }
        for change in &txn.changes {
            match change {
                Change::Row { op, relation, new, old } => {
                    println!("row {:?} {} new={} old={}", op, relation, row(new), row(old))
                }
                Change::Truncate { relations, cascade, restart_identity } => {
                    println!("truncate {} {} {}", relations.join(","), cascade, restart_identity)
                }
                Change::Message { prefix, content, transactional } => {
                    println!("message {} {} {}", prefix, content.len(), transactional)
                }
            }
        }
    }
}
