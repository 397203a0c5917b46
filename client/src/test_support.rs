//! What the crate's unit tests share.

/// The URL of a listener that accepts connections and never answers: enough for
/// `Client::connect`, and a broker that takes requests and answers none.
pub(crate) async fn silent_listener() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("tcp://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    url
}
