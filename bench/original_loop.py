"""A faithful re-creation of the original project's training loop, for timing comparisons.

ResNet18 from torchvision with a 3-way fc, inputs resized to 300x300 and normalised with
mean/std 0.5, every JPEG decoded again every epoch, fp32, DataLoader without workers, plain
SGD (lr 0.001, weight decay 0.01), batch 32, cross-entropy; frozen = only fc learns.
"""

from __future__ import annotations

import time

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.models import resnet18


class FolderList(Dataset):
    def __init__(self, items, classes):
        self.items = items
        self.index = {c: i for i, c in enumerate(classes)}
        self.tf = transforms.Compose([transforms.Resize((300, 300)), transforms.ToTensor(),
                                      transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        return self.tf(Image.open(path).convert("RGB")), self.index[label]


def original_epochs(train_items, val_items, classes, frozen: bool, epochs: int = 1, seed: int = 0) -> list[dict]:
    """Run the original loop; returns per-epoch {seconds, train_accuracy, val_accuracy}."""
    torch.manual_seed(seed)
    model = resnet18(weights=None)  # timing only: the original started from ImageNet weights
    if frozen:
        for p in model.parameters():
            p.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, len(classes))
    params = model.fc.parameters() if frozen else model.parameters()
    optimizer = torch.optim.SGD(params, lr=0.001, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    train_loader = DataLoader(FolderList(train_items, classes), batch_size=32, shuffle=True)
    val_loader = DataLoader(FolderList(val_items, classes), batch_size=32)
    rows = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        correct = n = 0
        for x, y in train_loader:
            optimizer.zero_grad()
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            optimizer.step()
            correct += (out.argmax(1) == y).sum().item()
            n += len(y)
        train_acc = correct / n
        model.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (model(x).argmax(1) == y).sum().item()
                n += len(y)
        rows.append({"seconds": time.perf_counter() - t0, "train_accuracy": train_acc, "val_accuracy": correct / n})
    return rows
