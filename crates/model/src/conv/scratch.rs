//! Scratch timing (not committed).
use super::cpu::*;
use super::direct;
#[repr(C)]
struct Ts { s: i64, ns: i64 }
unsafe extern "C" { fn clock_gettime(c: i32, t: *mut Ts) -> i32; }
fn cpu() -> f64 { let mut t = Ts { s: 0, ns: 0 }; unsafe { clock_gettime(2, &mut t) }; t.s as f64 + t.ns as f64 * 1e-9 }

fn geom(n: usize, c_in: usize, c_out: usize, hw: usize, s: usize) -> Geom {
    let ho = (hw + 2 - 3) / s + 1;
    Geom { n, c_in, h: hw, w: hw, c_out, k: 3, stride: s, padding: 1, h_out: ho, w_out: ho }
}

#[test]
#[ignore]
fn time_parts() {
    let shapes = [(3, 16, 32, 1), (16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1)];
    for (ci, co, hw, s) in shapes {
        let g = geom(128, ci, co, hw, s);
        let x: Vec<f32> = (0..g.n * ci * hw * hw).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..co * ci * 9).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut y = vec![0f32; g.n * co * g.h_out * g.w_out];
        let mut dx = vec![0f32; x.len()];
        let mut dw = vec![0f32; w.len()];
        let flops = 2.0 * (g.n * co * g.h_out * g.w_out * ci * 9) as f64;
        let t = |f: &mut dyn FnMut()| { f(); let mut b = f64::MAX; for _ in 0..7 { let t0 = cpu(); f(); b = b.min(cpu() - t0); } b };
        let d = direct::applies(&g); let di = direct::applies_to_input_grad(&g);
        let tf = t(&mut || if d { direct::forward(&g, &x, &w, mu(&mut y)) } else { forward(&g, &x, &w, &mut y) });
        let ti = t(&mut || if di { direct::backward_input(&g, &y, &w, mu(&mut dx)) } else { backward_input(&g, &y, &w, &mut dx) });
        let tw = t(&mut || if d { direct::backward_weight(&g, &y, &x, &mut dw) } else { backward_weight(&g, &y, &x, &mut dw) });
        println!("{ci:>3}->{co:<3} {hw}x{hw} s{s}: fwd {:.2} ms ({:.0} GF/s)  bwd_in {:.2} ms ({:.0})  bwd_w {:.2} ms ({:.0})",
            tf * 1e3, flops / tf / 1e9, ti * 1e3, flops / ti / 1e9, tw * 1e3, flops / tw / 1e9);
    }
}

fn mu(v: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] { unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut _, v.len()) } }
