//! A minimal IM-server integration: reads chat lines from stdin as `user: text`, sends each
//! to chatguard as a `moderate` request (pipelined), prints every verdict and pushed event,
//! and keeps a local set of muted/blocked users as an IM server would.
//!
//! ```sh
//! cargo run --release -- serve &            # or `make run`
//! printf 'alice: hello\nbob: go fuck yourself\n' | cargo run --example client
//! ```
//! Env: `CHATGUARD_URL` (default `ws://127.0.0.1:8686/v1/ws`), `CHATGUARD_TOKEN`.

use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("CHATGUARD_URL").unwrap_or_else(|_| "ws://127.0.0.1:8686/v1/ws".into());
    let mut req = url.into_client_request()?;
    if let Ok(token) = std::env::var("CHATGUARD_TOKEN") {
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    let (mut tx, mut rx) = ws.split();

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut sent = 0u64;
    let mut pending = 0u64;
    let mut stdin_open = true;
    // user → sanction state, as the IM server would enforce it.
    let mut sanctions: HashMap<String, String> = HashMap::new();
    while stdin_open || pending > 0 {
        tokio::select! {
            line = lines.next_line(), if stdin_open => match line? {
                Some(line) => {
                    let (user, text) = line.split_once(':').unwrap_or(("anonymous", &line));
                    let user = user.trim();
                    if matches!(sanctions.get(user).map(String::as_str), Some("mute" | "block")) {
                        println!("(dropped locally: {user} is {})", sanctions[user]);
                        continue;
                    }
                    sent += 1;
                    let msg = serde_json::json!({
                        "type": "moderate", "id": format!("m-{sent}"), "user": user,
                        "room": "lobby", "text": text.trim(),
                    });
                    tx.send(Message::text(msg.to_string())).await?;
                    pending += 1;
                }
                None => stdin_open = false,
            },
            frame = rx.next() => {
                let Some(frame) = frame else { break };
                let Message::Text(text) = frame? else { continue };
                let v: serde_json::Value = serde_json::from_str(text.as_str())?;
                match v["type"].as_str() {
                    Some("verdict") | Some("error") => {
                        pending = pending.saturating_sub(1);
                        println!("{v}");
                    }
                    Some("sanction") => {
                        let user = v["user"].as_str().unwrap_or_default().to_string();
                        let action = v["action"].as_str().unwrap_or_default().to_string();
                        println!("SANCTION {user} → {action} until {}", v["until"]);
                        sanctions.insert(user, action);
                    }
                    _ => println!("event {v}"),
                }
            }
        }
    }
    tx.send(Message::Close(None)).await.ok();
    Ok(())
}
