// Scratch (not committed): verified instruction counts of an object.
use lb_tests::kernel_net::{TestNet, lab_config};
use lb_userspace::dataplane::Dataplane;
#[test]
fn counts() {
    let net = TestNet::new();
    net.run(|| {
        for path in std::env::var("K24_OBJS").expect("K24_OBJS").split(',') {
            let object = std::fs::read(path).expect("read");
            let mut dp = Dataplane::load_object(&object, 65536).expect("load");
            dp.apply(&lab_config()).expect("apply");
            for name in [
                "lb",
                "lb_setup",
                "lb_proxy",
                "lb_v6",
                "lb_v6_setup",
                "lb_v6_portless",
            ] {
                let n = dp
                    .ebpf()
                    .program(name)
                    .expect(name)
                    .info()
                    .expect("info")
                    .verified_instruction_count()
                    .expect("count");
                println!("{path} {name}: {n}");
            }
        }
    });
}
