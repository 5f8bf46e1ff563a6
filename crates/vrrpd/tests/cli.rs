#[test]
fn cli_documents_its_arguments_and_fails_clearly_without_config() {
    tandem_e2e::assert_daemon_cli(std::path::Path::new(env!("CARGO_BIN_EXE_vrrpd")), "vrrpd");
}
