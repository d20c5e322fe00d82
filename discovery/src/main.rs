fn main() {
    eprintln!("trellis-discovery: not implemented yet");
    std::process::exit(2);
}
