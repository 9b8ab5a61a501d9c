"""Data sets for the demo, written in nnU-Net v2's raw format.

- ACDC cine cardiac MRI: a patient subset of ``Dataset027_ACDC`` where the project's shared data is present.
- Real lung CT: four non-small-cell lung cancer patients with their gross tumour volume (GTV), from PyPI.
- A generated 2D set (noise, disks and squares): the last fallback, and the tests' tiny data.

The CT scans and RTSTRUCT outlines of the Radiomics Digital Phantom ship inside the PyPI wheel
``pycerr==2.5.1``, so a demo needs nothing but PyPI. Each scan is a real patient's chest CT cropped to a box
around the tumour (41-60 axial slices of 3 mm, about 0.98 mm pixels); each RTSTRUCT holds one structure,
``GTV-1``, which becomes label 1 of an nnU-Net v2 raw data set.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile
from typing import Dict, List, Tuple

import numpy as np
import SimpleITK as sitk
from PIL import Image
from skimage.draw import polygon

ACDC_SOURCE = ('ACDC cine cardiac MRI (Bernard et al., IEEE TMI 2018), non-commercial research use; cite the '
               'paper. Labels: right ventricle (RV), myocardium (MLV), left-ventricle cavity (LVC).')
SYNTHETIC_SOURCE = 'generated images (noise with a bright disk and a dark square); no real data.'

PYCERR_SOURCE = ('Lung CT with GTV outlines of 4 patients from the Radiomics Digital Phantom (Lambin P, CancerData '
                 '2016, DOI 10.17195/candat.2016.08.1), as shipped in the PyPI wheel pycerr==2.5.1, licensed '
                 'CC BY-NC 3.0 (non-commercial use only).')

PYCERR_REQUIREMENT = 'pycerr==2.5.1'
WHEEL_PREFIX = 'cerr/datasets/radiomics_phantom_dicom/'
DICOM_FOLDER = 'radiomics_phantom_dicom'
# nnU-Net label of each class; every RTSTRUCT structure whose name starts with the class name is part of it.
LABELS: Dict[str, int] = {'background': 0, 'GTV': 1}


def fetch_pycerr_dicom(cache_dir: str) -> str:
    """The folder of ``pat_1`` .. ``pat_4`` DICOM folders, downloaded from PyPI into ``cache_dir`` once."""
    dest = os.path.join(cache_dir, DICOM_FOLDER)
    if os.path.isdir(os.path.join(dest, 'pat_1')):
        return dest
    result = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check',
                             PYCERR_REQUIREMENT, '-d', cache_dir], capture_output=True, text=True)
    wheels = glob.glob(os.path.join(cache_dir, 'pycerr-2.5.1-*.whl'))
    if result.returncode != 0 or not wheels:
        tail = '\n'.join((result.stdout + result.stderr).strip().splitlines()[-10:])
        raise RuntimeError(f'PyPI could not be reached: pip download {PYCERR_REQUIREMENT} failed '
                           f'(exit code {result.returncode}):\n{tail}')
    partial = dest + '.partial'
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member in wheel.infolist():
            if not member.filename.startswith(WHEEL_PREFIX) or member.is_dir():
                continue
            relative = member.filename[len(WHEEL_PREFIX):]
            if '..' in relative.split('/') or os.path.isabs(relative):
                raise RuntimeError(f'unsafe path in {wheels[0]}: {member.filename}')
            target = os.path.join(partial, *relative.split('/'))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with wheel.open(member) as src, open(target, 'wb') as dst:
                shutil.copyfileobj(src, dst)
    os.remove(wheels[0])
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)
    return dest


def _rasterise(structure_set, image: sitk.Image, class_name: str) -> np.ndarray:
    """Boolean (z, y, x) mask on ``image``'s grid of every structure whose name starts with ``class_name``.

    Contours of one structure on one slice are combined by XOR, so a contour inside another is a hole;
    different structures of the class are combined by union.
    """
    names = {roi.ROINumber: str(roi.ROIName) for roi in structure_set.StructureSetROISequence}
    numbers = {n for n, roi_name in names.items() if roi_name.upper().startswith(class_name.upper())}
    if not numbers:
        raise ValueError(f'no structure named {class_name}* in the RTSTRUCT; it has {sorted(names.values())}')
    size_x, size_y, size_z = image.GetSize()
    mask = np.zeros((size_z, size_y, size_x), bool)
    for roi_contour in structure_set.ROIContourSequence:
        if roi_contour.ReferencedROINumber not in numbers:
            continue
        structure = np.zeros_like(mask)
        for contour in roi_contour.get('ContourSequence', []):
            if contour.ContourGeometricType != 'CLOSED_PLANAR':
                continue
            points = np.asarray(contour.ContourData, float).reshape(-1, 3)
            index = np.array([image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])
            z = int(round(index[:, 2].mean()))
            if not 0 <= z < size_z:
                raise ValueError(f'a contour of {names[roi_contour.ReferencedROINumber]} lies outside the CT '
                                 f'(slice index {z}, the CT has {size_z} slices)')
            rows, cols = polygon(index[:, 1], index[:, 0], shape=(size_y, size_x))
            structure[z, rows, cols] ^= True
        mask |= structure
    return mask


def convert_rtstruct_dataset(dicom_root: str, raw_dir: str, dataset_id: int, name: str = 'LungCT') -> str:
    """Write ``raw_dir/Dataset{id:03d}_{name}`` (CT images, GTV labels, dataset.json); returns its folder.

    Every ``pat_<n>`` folder of ``dicom_root`` (one CT series and one ``DCM_RS_*.dcm`` RTSTRUCT) becomes case
    ``{name}_{n:03d}``; the labels are uint8 on the CT's grid.
    """
    try:
        import pydicom
    except ImportError as e:
        raise ImportError('reading RTSTRUCT files needs pydicom: pip install pydicom') from e
    folder = os.path.join(raw_dir, f'Dataset{dataset_id:03d}_{name}')
    os.makedirs(os.path.join(folder, 'imagesTr'), exist_ok=True)
    os.makedirs(os.path.join(folder, 'labelsTr'), exist_ok=True)
    patients = sorted(glob.glob(os.path.join(dicom_root, 'pat_*')), key=lambda p: int(p.rsplit('_', 1)[1]))
    if not patients:
        raise FileNotFoundError(f'no pat_* folders in {dicom_root}')
    for patient in patients:
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(patient)
        reader.SetFileNames(files)
        image = reader.Execute()
        structure_files = glob.glob(os.path.join(patient, 'DCM_RS_*.dcm'))
        if len(structure_files) != 1:
            raise ValueError(f'expected one DCM_RS_*.dcm RTSTRUCT in {patient}, found {len(structure_files)}')
        structure_set = pydicom.dcmread(structure_files[0])
        ct_frame = pydicom.dcmread(files[0], stop_before_pixels=True).FrameOfReferenceUID
        if any(roi.ReferencedFrameOfReferenceUID != ct_frame for roi in structure_set.StructureSetROISequence):
            raise ValueError(f'the RTSTRUCT of {patient} refers to another frame of reference than its CT')
        label = np.zeros(image.GetSize()[::-1], np.uint8)
        for class_name, value in LABELS.items():
            if value:
                label[_rasterise(structure_set, image, class_name)] = value
        label_image = sitk.GetImageFromArray(label)
        label_image.CopyInformation(image)
        case = f'{name}_{int(patient.rsplit("_", 1)[1]):03d}'
        sitk.WriteImage(image, os.path.join(folder, 'imagesTr', f'{case}_0000.nii.gz'))
        sitk.WriteImage(label_image, os.path.join(folder, 'labelsTr', f'{case}.nii.gz'))
    _write_json(os.path.join(folder, 'dataset.json'), {
        'name': name,
        'description': 'Chest CT of non-small-cell lung cancer patients (cropped around the tumour) with the gross '
                       'tumour volume (GTV) outlined for radiotherapy.',
        'reference': PYCERR_SOURCE,
        'licence': 'CC BY-NC 3.0 (https://creativecommons.org/licenses/by-nc/3.0/)',
        'channel_names': {'0': 'CT'},
        'labels': dict(LABELS),
        'numTraining': len(patients),
        'file_ending': '.nii.gz'})
    return folder


def _write_json(path: str, content: dict) -> None:
    with open(path, 'w') as f:
        json.dump(content, f, indent=2)


def acdc_subset(acdc_dir: str, raw_dir: str, dataset_id: int, train_patients: int, test_patients: int,
                name: str = 'ACDCDemo') -> Tuple[str, List[str]]:
    """Link a subset of ``Dataset027_ACDC`` (both frames of each patient) into ``raw_dir``.

    Training patients come from the training side of fold 0 of its patient-grouped ``splits_final.json``,
    test patients (``imagesTs``/``labelsTs``) from its validation side, so none is in both. Returns the data
    set folder and the names of the training cases.
    """
    with open(os.path.join(acdc_dir, 'splits_final.json')) as f:
        fold = json.load(f)[0]
    patients = {side: sorted({case.split('_')[0] for case in fold[side]}) for side in ('train', 'val')}
    chosen = {'Tr': patients['train'][:train_patients], 'Ts': patients['val'][:test_patients]}
    folder = os.path.join(raw_dir, f'Dataset{dataset_id:03d}_{name}')
    training = []
    for split, chosen_patients in chosen.items():
        for sub in (f'images{split}', f'labels{split}'):
            os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for patient in chosen_patients:
            for frame in ('frame01', 'frame02'):
                case = f'{patient}_{frame}'
                for src, dst in ((f'imagesTr/{case}_0000.nii.gz', f'images{split}/{case}_0000.nii.gz'),
                                 (f'labelsTr/{case}.nii.gz', f'labels{split}/{case}.nii.gz')):
                    target = os.path.join(folder, dst)
                    if not os.path.lexists(target):
                        os.symlink(os.path.abspath(os.path.join(acdc_dir, src)), target)
                if split == 'Tr':
                    training.append(case)
    with open(os.path.join(acdc_dir, 'dataset.json')) as f:
        dataset_json = json.load(f)
    _write_json(os.path.join(folder, 'dataset.json'), dict(dataset_json, numTraining=len(training),
                                                           reference=ACDC_SOURCE))
    return folder, training


def _synthetic_case(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Noise with a bright disk (label 1) and a dark square (label 2) at random places."""
    image = rng.normal(0.5, 0.08, (size, size))
    label = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.integers(14, size - 14), rng.integers(14, size - 14), rng.integers(6, 11)
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    image[disk] += 0.35
    label[disk] = 1
    s = rng.integers(6, 12)
    y0, x0 = rng.integers(0, size - s, 2)
    square = np.zeros_like(disk)
    square[y0:y0 + s, x0:x0 + s] = True
    square &= ~disk
    image[square] -= 0.35
    label[square] = 2
    return (np.clip(image, 0, 1) * 255).astype(np.uint8), label


def make_synthetic_dataset(raw_dir: str, dataset_id: int = 901, n_train: int = 10, n_test: int = 3, seed: int = 0,
                           size: int = 64, name: str = 'Tiny') -> str:
    """Write ``Dataset{id}_{name}`` (PNG, ``size`` x ``size``, 3 classes) under ``raw_dir``; returns its folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_dir, f'Dataset{dataset_id:03d}_{name}')
    for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for split, n in (('Tr', n_train), ('Ts', n_test)):
        for i in range(n):
            image, label = _synthetic_case(rng, size)
            Image.fromarray(image).save(os.path.join(folder, f'images{split}', f'case{split}{i:03d}_0000.png'))
            Image.fromarray(label).save(os.path.join(folder, f'labels{split}', f'case{split}{i:03d}.png'))
    _write_json(os.path.join(folder, 'dataset.json'), {
        'channel_names': {'0': 'grey'}, 'labels': {'background': 0, 'disk': 1, 'square': 2},
        'numTraining': n_train, 'file_ending': '.png', 'reference': SYNTHETIC_SOURCE})
    return folder
