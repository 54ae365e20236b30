"""GRACE's codebook rules (add, expand, split) and deferral, on hand-made keys."""
import torch

from editpeft.codebook import Codebook


def test_add_expand_split():
    book = Codebook.empty(2, 1)
    book, i = book.insert(torch.tensor([0.0, 0.0]), label=1, eps_init=1.0, init_value=torch.tensor([5.0]))
    assert i == 0 and book.radii.tolist() == [1.0]
    # far away: a new entry
    book, i = book.insert(torch.tensor([10.0, 0.0]), label=2, eps_init=1.0, init_value=torch.tensor([6.0]))
    assert i == 1 and len(book) == 2
    # within eps_i + eps_init of entry 0, same label: expand entry 0's radius to the distance
    book, i = book.insert(torch.tensor([1.5, 0.0]), label=1, eps_init=1.0, init_value=torch.tensor([0.0]))
    assert i is None and len(book) == 2 and book.radii[0].item() == 1.5
    # within range of entry 1, other label: split, both radii d/2
    book, i = book.insert(torch.tensor([10.0, 1.0]), label=3, eps_init=1.0, init_value=torch.tensor([7.0]))
    assert i == 2 and book.radii.tolist() == [1.5, 0.5, 0.5]


def test_replace_only_inside_radius():
    book = Codebook(torch.tensor([[0.0, 0.0]]), torch.tensor([[9.0]]), torch.tensor([1.0]), torch.tensor([1]))
    inputs = torch.tensor([[[0.5, 0.0], [3.0, 0.0]]])
    out = torch.tensor([[[1.0], [2.0]]])
    assert book.replace(inputs, out).tolist() == [[[9.0], [2.0]]]
    assert Codebook.empty(2, 1).replace(inputs, out) is out
