// Times the phases of training on a corpus dumped as <name>.bin (UTF-8) + <name>.off (u64 offsets).
// cargo run --release --example profile -- /tmp/shards 32503 2
use raychat_bpe::train::Trainer;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let data = std::fs::read(format!("{}.bin", args[1])).unwrap();
    let off_bytes = std::fs::read(format!("{}.off", args[1])).unwrap();
    let offsets: Vec<u64> = off_bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    let merges: usize = args[2].parse().unwrap();
    let threads: usize = args[3].parse().unwrap();
    let t = Instant::now();
    let mut n = 0u64;
    raychat_bpe::split::for_each_chunk(&data, |_| n += 1);
    println!("split only: {} chunks {:.3}s", n, t.elapsed().as_secs_f64());
    for _ in 0..2 {
        let mut trainer = Trainer::new(threads);
        let t = Instant::now();
        trainer.feed(&data, &offsets).unwrap();
        let count = t.elapsed().as_secs_f64();
        let t = Instant::now();
        trainer.train(merges, true).unwrap();
        println!("count {:.3}s merge {:.3}s", count, t.elapsed().as_secs_f64());
    }
}
