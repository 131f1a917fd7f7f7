"""Diagnostic behind the count_include_pad change (RESULTS.md, anomaly section): image AUROC of raw,
smoothed and interior-only patch maxima on 12 good + 20 local brick test parts, fp32 lite, 16 shots.
It looks at test images, so it guides follow-ups only. Run: PYTHONPATH=. python benchmarks/anomaly_border_diagnostic.py"""
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from clipxfer.anomaly.coreset import greedy_coreset
from clipxfer.anomaly.detector import nearest_distances, split_good, upsample_and_smooth
from clipxfer.anomaly.patches import whole_image
from clipxfer.encoders import load_encoder
from clipxfer.images import find_images

root='/tmp/tex/brick'
train=list(find_images(root+'/train/good'))
fit,_=split_good(len(train),16,1)
test=list(find_images(root+'/test/good'))[:12]+[p for k in ['scratch','hole','stain','missing_thread','colour_spot'] for p in list(find_images(root+'/test/'+k))[:4]]
y=np.array([0]*12+[1]*20)
e=load_encoder('lite','cpu','fp32')
def raw(paths):
    px=np.stack([whole_image(p,224)[0] for p in paths])
    out=[]
    for i in range(0,len(px),8):
        out.append([m for m in e.encode_patches(px[i:i+8]).maps])
    return [np.concatenate([o[j] for o in out]) for j in range(2)]
A=raw([train[i] for i in fit]); B=raw(test)
np.savez('/tmp/variants.npz',a0=A[0],a1=A[1],b0=B[0],b1=B[1])
def agg(maps,pad):
    parts=[]
    for m in maps:
        x=torch.from_numpy(m).permute(0,3,1,2)
        x=F.avg_pool2d(x,3,1,1,count_include_pad=pad)
        x=F.interpolate(x,size=(28,28),mode='bilinear',align_corners=False)
        parts.append(x)
    return torch.cat(parts,1).permute(0,2,3,1).numpy()
for pad in [False,True]:
    a=agg(A,pad); b=agg(B,pad)
    bank=a.reshape(-1,a.shape[-1]); bank=bank[greedy_coreset(bank,4096,1)]
    g=nearest_distances(b.reshape(-1,bank.shape[1]),bank)[:,0].reshape(len(b),28,28)
    print('pad',pad,'raw max',roc_auc_score(y,g.reshape(len(b),-1).max(1)),'smoothed max',roc_auc_score(y,upsample_and_smooth(g,224).reshape(len(b),-1).max(1)),
          'interior raw max',roc_auc_score(y,g[:,1:-1,1:-1].reshape(len(b),-1).max(1)), flush=True)
