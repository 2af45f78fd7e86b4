//! A TCP proxy that makes faults on purpose between qtune and a server it depends on (the S3
//! server): forward, freeze (connections stay open, nothing moves: a server that stopped
//! answering), refuse (every connection closed at once, new ones too: a server that is gone), or delay
//! every request (a slow server). Threads and std only: it must not share a runtime with what
//! it breaks.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    Freeze,
    Refuse,
    /// Each burst of bytes from the client waits this long before it is forwarded.
    Delay(Duration),
}

pub struct FaultProxy {
    pub port: u16,
    fault: Arc<Mutex<Fault>>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl FaultProxy {
    /// Forwards 127.0.0.1:`port` to `upstream` until the test process ends.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fault = Arc::new(Mutex::new(Fault::None));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (f, o) = (fault.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if *f.lock().unwrap() == Fault::Refuse {
                    reset(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    reset(client);
                    continue;
                };
                {
                    let mut open = o.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (f1, f2) = (f.clone(), f.clone());
                std::thread::spawn(move || pump(client, server, f1, true));
                std::thread::spawn(move || pump(s2, c2, f2, false));
            }
        });
        FaultProxy { port, fault, open }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// From now on; `Refuse` also cuts every connection open now.
    pub fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
        if fault == Fault::Refuse {
            for conn in self.open.lock().unwrap().drain(..) {
                let _ = conn.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Closes at once, before a byte is read: to the client, a server that hung up.
fn reset(stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Both);
}

/// Copies `from` → `to` as the fault allows, until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream, fault: Arc<Mutex<Fault>>, from_client: bool) {
    from.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let now = *fault.lock().unwrap();
        match now {
            Fault::Refuse => break,
            Fault::Freeze => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            _ => {}
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        if let (Fault::Delay(d), true) = (now, from_client) {
            std::thread::sleep(d);
        }
        // a freeze that began while this burst was read holds it until it ends
        while *fault.lock().unwrap() == Fault::Freeze {
            std::thread::sleep(Duration::from_millis(50));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
