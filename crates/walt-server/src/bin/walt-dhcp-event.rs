//! `walt-dhcp-event`: the DHCP server's hook. Hands each lease commit to
//! the running walt-server over its local socket and returns at once
//! (see `walt_server::nodes::event`).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(walt_server::nodes::event::client_main(&args));
}
