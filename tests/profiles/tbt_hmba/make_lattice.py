"""Writes hmba6.m: six cells of pyAT's machine_data/hmba.mat (the ESRF-EBS hybrid multi-bend cell) as a small
ring of 60 BPMs (run once; the file is committed). Periodicity 1, one RF cavity at harmonic 6 x 31."""

import os
import warnings

import at
import machine_data

warnings.simplefilter("ignore")
cell = at.load_lattice(os.path.join(os.path.dirname(machine_data.__file__), "hmba.mat"))
ncell = 6
elems = []
for k in range(ncell):
    for e in cell.deepcopy():
        if isinstance(e, at.RFCavity):
            if k:
                continue
            e.HarmNumber = 31 * ncell
            e.Voltage = e.Voltage * ncell
        elems.append(e)
ring = at.Lattice(elems, name="hmba6", energy=cell.energy, periodicity=1)
ring.save(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hmba6.m"))
print(len(ring), ring.circumference, ring.get_tune(), ring.get_chrom())
