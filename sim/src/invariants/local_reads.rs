//! A local read (`consistency=local`, served from the gateway's own region's copy) may be
//! behind, but it never invents: every value it returns is one some client tried to write to
//! that same key. A read that answered with another key's value, or with bytes nobody wrote,
//! would show a routing or storage mix-up that the linearizable history (which leaves local
//! reads out) cannot see.

use super::Violation;
use crate::world::World;

pub fn check(world: &World) -> Result<(), Violation> {
    let attempted = world.attempted.lock().expect("attempted lock");
    let answers = world.local_answers.lock().expect("local answers lock");
    for (key, value) in answers.iter() {
        if !attempted.contains(&(key.clone(), value.clone())) {
            return Err(Violation {
                invariant: "local reads return written values".into(),
                detail: format!("a local read of {key} returned {value:?}, which no client wrote to it"),
            });
        }
    }
    Ok(())
}
