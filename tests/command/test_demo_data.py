"""The demo's real data: lung CT with GTV outlines from the pycerr wheel on PyPI, as an nnU-Net raw data set."""
import glob
import json
import os
from typing import List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_emcad.command import demo_data
from nnunet_emcad.command.demo_data import PYCERR_SOURCE, convert_rtstruct_dataset, fetch_pycerr_dicom


def _gtv_polygons(structure_file: str) -> Tuple[float, List[float]]:
    """Total area (mm², shoelace formula) and z positions (mm) of the GTV's polygons, read without rasterising."""
    import pydicom
    area, z = 0.0, []
    for contour in pydicom.dcmread(structure_file).ROIContourSequence[0].ContourSequence:
        x, y, zs = np.asarray(contour.ContourData, float).reshape(-1, 3).T
        area += 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        z.append(zs[0])
    return area, z


def test_pycerr_lung_ct_becomes_nnunet_dataset(tmp_path, monkeypatch):
    pytest.importorskip('pydicom', reason='pydicom is not installed (pip install pydicom)')
    try:
        dicom_root = fetch_pycerr_dicom(str(tmp_path / 'cache'))
    except RuntimeError as e:
        pytest.skip(f'PyPI is not reachable, so the pycerr wheel cannot be fetched: {e}')
    assert sorted(os.listdir(tmp_path / 'cache')) == ['radiomics_phantom_dicom']  # wheel deleted, nothing else

    def no_download(*args, **kwargs):
        raise AssertionError('fetch_pycerr_dicom ran pip although the data are cached')
    monkeypatch.setattr(demo_data.subprocess, 'run', no_download)
    assert fetch_pycerr_dicom(str(tmp_path / 'cache')) == dicom_root

    folder = convert_rtstruct_dataset(dicom_root, str(tmp_path / 'raw'), 7)
    assert folder == str(tmp_path / 'raw' / 'Dataset007_LungCT')
    with open(os.path.join(folder, 'dataset.json')) as f:
        dataset = json.load(f)
    assert dataset['channel_names'] == {'0': 'CT'}
    assert dataset['labels'] == {'background': 0, 'GTV': 1}
    assert dataset['numTraining'] == 4 and dataset['file_ending'] == '.nii.gz'
    assert '10.17195/candat.2016.08.1' in dataset['reference'] and 'CC BY-NC 3.0' in dataset['licence']
    assert 'CC BY-NC 3.0' in PYCERR_SOURCE and '10.17195/candat.2016.08.1' in PYCERR_SOURCE

    cases = sorted(os.path.basename(p)[:-len('.nii.gz')] for p in glob.glob(os.path.join(folder, 'labelsTr', '*')))
    assert cases == ['LungCT_001', 'LungCT_002', 'LungCT_003', 'LungCT_004']
    gtv_hu = []
    for case, tumour_slices in zip(cases, (26, 7, 12, 23)):  # one GTV contour per slice in these RTSTRUCTs
        image = sitk.ReadImage(os.path.join(folder, 'imagesTr', f'{case}_0000.nii.gz'))
        label = sitk.ReadImage(os.path.join(folder, 'labelsTr', f'{case}.nii.gz'))
        assert label.GetPixelID() == sitk.sitkUInt8
        assert label.GetSize() == image.GetSize()
        np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
        labels, hu = sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(image)
        assert set(np.unique(labels)) == set(dataset['labels'].values())
        structure_file = glob.glob(os.path.join(dicom_root, f'pat_{int(case[-3:])}', 'DCM_RS_*.dcm'))[0]
        area, z = _gtv_polygons(structure_file)
        expected_slices = np.round((np.array(z) - image.GetOrigin()[2]) / image.GetSpacing()[2])
        assert len(expected_slices) == tumour_slices
        assert np.flatnonzero(labels.any(axis=(1, 2))).tolist() == sorted(expected_slices.astype(int).tolist())
        volume_ml = np.count_nonzero(labels) * np.prod(label.GetSpacing()) / 1000
        assert volume_ml == pytest.approx(area * label.GetSpacing()[2] / 1000, rel=0.05)
        assert hu.min() >= -1024 and np.mean(hu < -400) > 0.25  # Hounsfield units of a chest CT: much air/lung
        assert np.median(hu[labels == 1]) > -300  # a tumour is soft tissue, not aerated lung
        gtv_hu.append(hu[labels == 1])
    gtv_hu = np.concatenate(gtv_hu)
    assert -100 < np.median(gtv_hu) < 100 and np.mean(gtv_hu < -400) < 0.15

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(folder, num_processes=2)
