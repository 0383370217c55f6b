use candle_core::{Device, Tensor, D};
use dynexec_exit::token_exit::ExitAdapters;
use dynexec_models::llama::load_decoder;
fn main() -> anyhow::Result<()> {
    let hub = dynexec_hub::Hub::from_env()?;
    let files = hub.resolve("smollm2-135m-instruct")?;
    let loaded = load_decoder(&files, None, None, &Device::Cpu)?;
    let model = &loaded.model;
    let adapters = ExitAdapters::load(std::path::Path::new(&std::env::args().nth(1).unwrap()), &Device::Cpu)?;
    let text = std::fs::read_to_string(std::env::var("HOME")? + "/.cache/dynexec/data/sotu/heldout.txt")?;
    let mut ids = loaded.tokenizer.encode(&text)?;
    ids.truncate(257);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let mut cache = model.new_cache();
    let mut h = model.embed(&input)?;
    let mut done = 0;
    let mut exits = vec![];
    for &l in &adapters.card.layers { h = model.forward_layers(&h, done..l, &mut cache, None)?; exits.push(h.clone()); done = l; }
    h = model.forward_layers(&h, done..30, &mut cache, None)?;
    let full = candle_nn::ops::log_softmax(&model.head(&h)?.squeeze(0)?, D::Minus1)?;
    let tgt = Tensor::new(&ids[1..], &Device::Cpu)?;
    let n = ids.len() - 1;
    let nll = |lp: &Tensor| -> anyhow::Result<Vec<f32>> { Ok(lp.narrow(0,0,n)?.gather(&tgt.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?.to_vec1()?) };
    let fnll = nll(&full)?;
    let ftop: Vec<u32> = full.argmax(D::Minus1)?.to_vec1()?;
    println!("full mean nll {:.2}", fnll.iter().sum::<f32>() / n as f32);
    let cls = adapters.classifiers().unwrap();
    for (i, e) in exits.iter().enumerate() {
        let adapted = adapters.adapt(i, e)?;
        let lp = candle_nn::ops::log_softmax(&model.head(&adapted)?.squeeze(0)?, D::Minus1)?;
        let enll = nll(&lp)?;
        let top: Vec<u32> = lp.argmax(D::Minus1)?.to_vec1()?;
        let p = cls.probabilities(i, &adapted.squeeze(0)?)?;
        let agree = top.iter().zip(&ftop).filter(|(a,b)| a==b).count();
        let sel: Vec<usize> = (0..n).filter(|&k| p[k] >= 0.9).collect();
        let sel_agree = sel.iter().filter(|&&k| top[k]==ftop[k]).count();
        let sel_nll: f32 = sel.iter().map(|&k| enll[k] - fnll[k]).sum::<f32>();
        let big = sel.iter().filter(|&&k| enll[k] > 12.0).count();
        println!("exit {} agree {:.1}% mean nll {:.2} | p>=0.9: {} sel, agree {}, extra nll sum {:.1}, nll>12: {}", adapters.card.layers[i], 100.0*agree as f64/n as f64, enll.iter().sum::<f32>()/n as f32, sel.len(), sel_agree, sel_nll, big);
    }
    Ok(())
}
