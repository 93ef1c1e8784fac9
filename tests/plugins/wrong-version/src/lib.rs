//! A component built for an interface version the runtime does not support.

wit_bindgen::generate!({
    inline: "
        package trainer:plugin@9.0.0;
        interface info {
            describe: func() -> string;
        }
        world plugin {
            export info;
        }
    ",
    world: "plugin",
});

struct Future;

impl exports::trainer::plugin::info::Guest for Future {
    fn describe() -> String {
        "from the future".into()
    }
}

export!(Future);
