use synthos_engine::pipeline::SynthosPipeline;
use synthos_engine::train::{TrainConfig, Trainer};
use synthos_engine::{DType, Device};
fn main() {
    let pipe = SynthosPipeline::demo(Device::Cpu, DType::F32, &[]).unwrap();
    let out = std::env::args().nth(1).unwrap();
    let steps: u64 = std::env::args().nth(2).unwrap().parse().unwrap();
    let cfg = TrainConfig { output: out.into(), max_steps: Some(steps), ..Default::default() };
    let mut t = Trainer::new(pipe, cfg).unwrap();
    let s = t.run().unwrap();
    println!("{:?}", s);
}
