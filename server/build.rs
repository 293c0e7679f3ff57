//! Release builds embed `target/site`; tell cargo to rebuild the server when the
//! site changes. Debug builds read the folder at run time and need no rebuild.
fn main() {
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        println!("cargo:rerun-if-changed=../target/site");
    }
    println!("cargo:rerun-if-changed=../migrations");
}
