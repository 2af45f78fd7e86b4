//! The database migrations are embedded by `sqlx::migrate!` at compile time: a migration added
//! or changed must rebuild the crate (sqlx's own advice), which cargo does not know unless told.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
