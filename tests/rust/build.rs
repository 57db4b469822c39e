//! Takes the Rust block of the "--payload bincode" section of docs/replication-message.md,
//! so the definitions compiled here are the documented ones, character for character.

fn main() {
    let doc_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/replication-message.md");
    println!("cargo:rerun-if-changed={doc_path}");
    let doc = std::fs::read_to_string(doc_path).expect("read docs/replication-message.md");
    let section = doc.split("### `--payload bincode`").nth(1).expect("payload section");
    let code = section.split("```rust").nth(1).expect("rust block").split("```").next().unwrap();
    let out = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("definitions.rs");
    std::fs::write(out, code).expect("write definitions");
}
