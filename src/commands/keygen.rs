//! `cacher keygen FILE`: write an ed25519 key pair for signed entries, FILE (private,
//! mode 0600) and FILE.pub, touching no store.

use super::Outcome;
use crate::cli::KeygenArgs;
use crate::sign;

pub fn run(args: &KeygenArgs) -> anyhow::Result<Outcome> {
    let id = sign::keygen(&args.file)?;
    let public = sign::pub_path(&args.file);
    crate::ui::status(format!(
        "wrote {} (private: give it only to jobs whose uploads others restore) and {} (public); key id {id}",
        args.file.display(),
        public.display()
    ));
    if crate::ui::json_enabled() {
        crate::ui::json(serde_json::json!({
            "command": "keygen", "private_key": args.file, "public_key": public, "key_id": id,
        }));
    }
    Ok(Outcome::Success)
}
