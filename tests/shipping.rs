//! What ships beside the binary: shell completions and the man page.

use crate::util::{TestEnv, sh};

#[test]
fn completions_load_in_bash_and_man_page_renders() {
    let env = TestEnv::bare();
    let run = env.run(["completions", "bash"]);
    let script = env.write("cacher.bash", &run.ok().stdout);
    let loaded = sh(
        &format!("source '{}' && complete -p cacher", script.display()),
        env.dir.path(),
    );
    assert!(loaded.contains("_cacher"), "{loaded}");
    for shell in ["zsh", "fish"] {
        let run = env.run(["completions", shell]);
        assert!(run.ok().stdout.contains("upload"), "{shell}");
    }
    env.run(["completions", "tcsh"]).code(2);

    let man = env.run(["man"]);
    let page = &man.ok().stdout;
    assert!(page.contains(".TH cacher 1"), "{page}");
    assert!(page.contains("download"), "subcommands listed");
}
