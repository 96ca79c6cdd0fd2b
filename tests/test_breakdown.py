"""bench/breakdown.py: categories of HLO instructions, the instruction map of HLO text, and
step breakdowns of CPU-shaped and GPU-shaped traces; one real CPU profile of a tiny MoE
step on 2 expert shards (bench/profile.py)."""

import jax
import pytest

from bench import breakdown, harness, profile
from conftest import tiny_config

HLO = """HloModule jit_train_step, is_scheduled=true, entry_computation_layout={(bf16[64,32]{1,0})->f32[]}

%fused_dot (param_0: bf16[64,32], param_1: bf16[32,16]) -> bf16[64,16] {
  %param_0 = bf16[64,32]{1,0} parameter(0)
  %param_1 = bf16[32,16]{1,0} parameter(1)
  ROOT %dot.1 = bf16[64,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/transpose(jvp(experts))/ecd,edf->ecf/dot_general" stack_frame_id=3}
}

%wrapped_all_to_all (p0: bf16[8,16]) -> bf16[8,16] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  ROOT %all-to-all.1 = bf16[8,16]{1,0} all-to-all(%p0), replica_groups={{0,1}}, dimensions={0}, metadata={op_name="jit(train_step)/jvp(dispatch)/all_to_all"}
}

%fused_adam (param_0.1: f32[8]) -> f32[8] {
  %param_0.1 = f32[8]{0} parameter(0)
  ROOT %mul.7 = f32[8]{0} multiply(%param_0.1, %param_0.1), metadata={op_name="jit(train_step)/optimizer/mul"}
}

%body (arg: (s32[], f32[8])) -> (s32[], f32[8]) {
  %arg = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %gte = f32[8]{0} get-tuple-element(%arg), index=1
  %loop_fusion.3 = f32[8]{0} fusion(%gte), kind=kLoop, calls=%fused_adam, metadata={op_name="jit(train_step)/optimizer/mul"}
  ROOT %tuple.2 = (s32[], f32[8]{0}) tuple(%i, %loop_fusion.3)
}

%cond (arg.1: (s32[], f32[8])) -> pred[] {
  %arg.1 = (s32[], f32[8]{0}) parameter(0)
  ROOT %lt = pred[] constant(false)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

ENTRY %main.9 (p: bf16[64,32], w: bf16[32,16], x: bf16[8,16], t: (s32[], f32[8])) -> f32[] {
  %p = bf16[64,32]{1,0} parameter(0), metadata={op_name="p"}
  %w = bf16[32,16]{1,0} parameter(1), metadata={op_name="w"}
  %x = bf16[8,16]{1,0} parameter(2)
  %t = (s32[], f32[8]{0}) parameter(3)
  %gemm_fusion_dot.2 = bf16[64,16]{1,0} fusion(%p, %w), kind=kCustom, calls=%fused_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.4 = (bf16[64,16]{1,0}, s8[1024]{0}) custom-call(%p, %w), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/jvp(attn_proj)/dot_general"}
  %custom-call.5 = (bf16[2,8,4,16]{3,2,1,0}, u8[0]{0}) custom-call(%x, %x, %x), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(train_step)/jvp(attention)/jit(dot_product_attention)/dot_product_attention_fwd"}
  %all-to-all-start = ((bf16[8,16]{1,0}), bf16[8,16]{1,0}) async-start(%x), calls=%wrapped_all_to_all
  %all-to-all-done = bf16[8,16]{1,0} async-done(%all-to-all-start)
  %all-reduce-start = f32[8]{0} all-reduce-start(%x), replica_groups={}, to_apply=%add, metadata={op_name="jit(train_step)/transpose(jvp(attn_proj))/psum"}
  %fusion.6 = f32[64]{0} fusion(%p), kind=kInput, calls=%fused_adam, metadata={op_name="jit(train_step)/jvp(router)/top_k"}
  %while = (s32[], f32[8]{0}) while(%t), condition=%cond, body=%body
  ROOT %r = f32[] constant(0)
}
"""


@pytest.mark.parametrize('opcode, op_name, expected', [
    ('fusion', 'jit(train_step)/transpose(jvp(experts))/cd,df->cf/dot_general', 'expert_matmul'),
    ('fusion', 'jit(s)/jvp(attention)/jvp(experts)/mul', 'expert_matmul'),  # innermost scope
    ('dot', 'jit(s)/transpose(jvp(attention))/bgqk,bgmk->bgqm/dot_general', 'attention'),
    ('fusion', 'jit(s)/jvp(dot_product_attention)/exp', 'rest'),  # whole labels only
    ('fusion', 'jit(s)/jvp(attn_proj)/dot_general', 'rest'),
    ('fusion', 'jit(s)/jvp(loss)/td,vd->tv/dot_general', 'rest'),
    ('fusion', 'jit(s)/while/body/closed_call/router/top_k', 'dispatch_combine'),
    ('scatter', 'jit(s)/transpose(jvp(dispatch))/gather', 'dispatch_combine'),
    ('fusion', 'jit(s)/jvp(combine)/scatter-add', 'dispatch_combine'),
    ('fusion', 'jit(s)/optimizer/add', 'optimizer'),
    ('all-to-all', 'jit(s)/jvp(experts)/all_to_all', 'all_to_all'),  # opcode first
    ('ragged-all-to-all', '', 'all_to_all'),
    ('all-reduce-start', 'jit(s)/optimizer/psum', 'collectives'),
    ('all-gather', '', 'collectives'),
    ('reduce-scatter', 'jit(s)/transpose(jvp(experts))/all_gather', 'collectives'),
    ('copy', '', 'rest'),
])
def test_category(opcode, op_name, expected):
  assert breakdown.category(opcode, op_name) == expected


def test_instructions_of_hlo_text():
  instrs = breakdown.instructions(HLO)
  assert breakdown.module_name(HLO) == 'jit_train_step'
  # A fusion without metadata takes its called computation's root's.
  assert instrs['gemm_fusion_dot.2'] == breakdown.Instruction(
      'gemm_fusion_dot.2', 'fusion',
      'jit(train_step)/transpose(jvp(experts))/ecd,edf->ecf/dot_general')
  assert instrs['custom-call.4'].opcode == 'custom-call'  # tuple-shaped result
  # Async wrappers take the wrapped collective's opcode and metadata; the done op reaches
  # it through its start operand.
  for name in ('all-to-all-start', 'all-to-all-done'):
    assert instrs[name].opcode == 'all-to-all'
    assert instrs[name].op_name == 'jit(train_step)/jvp(dispatch)/all_to_all'
  assert instrs['all-reduce-start'].opcode == 'all-reduce-start'
  assert instrs['loop_fusion.3'].op_name == 'jit(train_step)/optimizer/mul'  # in a while body
  assert instrs['while'].opcode == 'while' and instrs['p'].op_name == 'p'
  assert instrs['sum'].opcode == 'add' and instrs['sum'].op_name == ''
  cats = {n: breakdown.category(i.opcode, i.op_name) for n, i in instrs.items()}
  assert cats['gemm_fusion_dot.2'] == 'expert_matmul' and cats['custom-call.5'] == 'attention'
  assert cats['all-to-all-done'] == 'all_to_all' and cats['all-reduce-start'] == 'collectives'
  assert cats['fusion.6'] == 'dispatch_combine' and cats['custom-call.4'] == 'rest'


def _meta(pid, name, tid=None):
  if tid is None:
    return dict(ph='M', pid=pid, name='process_name', args=dict(name=name))
  return dict(ph='M', pid=pid, tid=tid, name='thread_name', args=dict(name=name))


def _x(pid, tid, ts, dur, event_name, **args):
  return dict(ph='X', pid=pid, tid=tid, ts=ts, dur=dur, name=event_name, args=args)


def test_cpu_shaped_trace():
  """XLA:CPU: events named by instruction with args hlo_op/hlo_module/device_ordinal; a
  while op's event holds its body's events (self time), two threads overlap."""
  cpu = lambda tid, ts, dur, op, **kw: _x(7, tid, ts, dur, op, hlo_op=op,
                                          hlo_module='jit_train_step', device_ordinal='0',
                                          _src='thunk_executor.cc', **kw)
  events = [_meta(7, '/host:CPU'), _meta(7, 'python', 1), _meta(7, 'tf_XLAEigen/1', 2)]
  for step in range(2):
    t0 = step * 1000.0
    events += [
        cpu(2, t0, 300.0, 'gemm_fusion_dot.2'),
        cpu(3, t0 + 100, 100.0, 'custom-call.5'),  # concurrent, other thread
        cpu(2, t0 + 300, 200.0, 'while'),
        cpu(2, t0 + 320, 50.0, 'loop_fusion.3'),  # inside the while
        cpu(2, t0 + 400, 40.0, 'loop_fusion.3'),
        cpu(2, t0 + 500, 60.0, 'all-to-all-start'),
        cpu(2, t0 + 560, 40.0, 'fusion.6'),
        cpu(2, t0 + 600, 10.0, 'not_in_module.1'),
        _x(7, 2, t0 + 610, 1.0, 'end: fusion.6', _src='thunk_executor.cc'),  # no hlo_op
        _x(7, 1, t0, 700.0, 'PjitFunction(jit(train_step))'),  # host, no hlo_op
    ]
  found = breakdown.device_events(dict(traceEvents=events))
  assert len(found) == 16 and {e.device for e in found} == {'cpu:0'}
  r = breakdown.breakdown(found, breakdown.instructions(HLO), steps=2,
                          module=breakdown.module_name(HLO), step_s=0.0007)
  cats = r['categories']
  assert cats['expert_matmul'] == pytest.approx(0.3)
  assert cats['attention'] == pytest.approx(0.1)
  assert cats['optimizer'] == pytest.approx(0.09)
  assert cats['rest'] == pytest.approx(0.11)  # the while op's own time
  assert cats['all_to_all'] == pytest.approx(0.06)
  assert cats['dispatch_combine'] == pytest.approx(0.04)
  assert cats['collectives'] == 0.0
  assert r['unattributed_ms'] == pytest.approx(0.01)
  assert r['op_ms'] == pytest.approx(0.71)
  assert r['shares']['expert_matmul'] == pytest.approx(0.3 / 0.71)
  assert r['busy_ms'] == pytest.approx(0.61) and r['step_ms'] == pytest.approx(0.7)
  assert r['scopes']['optimizer'] == pytest.approx(0.09)
  assert r['unattributed_top'] == [('not_in_module.1', pytest.approx(0.01))]
  table = breakdown.format_table(r)
  assert 'UNATTRIBUTED' in table and 'expert_matmul' in table and 'cpu:0' in table


def test_gpu_shaped_trace():
  """GPU: kernels on the `Stream #N(...)` lines of /device:GPU:N carry their instruction in
  args (hlo_op, hlo_module); the kernel name is CUDA's. Host events with hlo_op and the
  derived `XLA Ops` line are not counted again; a kernel of another module is unattributed."""
  def kernel(pid, tid, ts, dur, name, op=None, module='jit_train_step'):
    args = dict(correlation_id=ts, context_id='$$1', tf_op='XlaModule', program_id=3)
    if op is not None:  # from the annotation XlaModule:#...hlo_module=#::Thunk:#name=,hlo_op=#
      args.update(hlo_op=op, hlo_module=module, name='jvp(experts)/dot_general')
    return _x(pid, tid, ts, dur, name, **args)

  events = [_meta(1, '/device:GPU:0'), _meta(2, '/device:GPU:1'), _meta(9, '/host:CPU'),
            _meta(1, 'Stream #7(Kernel)', 7), _meta(1, 'Stream #13(Kernel,MemcpyD2D)', 13),
            _meta(1, 'XLA Ops', 99), _meta(2, 'Stream #7(Kernel)', 7),
            _meta(2, 'Stream #13(Kernel,MemcpyD2D)', 13),
            _meta(9, 'tf_pjrt_thread', 5)]
  for pid in (1, 2):
    events += [
        kernel(pid, 7, 10.0, 400.0, 'sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x'
               '128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas',
               'gemm_fusion_dot.2'),
        kernel(pid, 7, 410.0, 200.0, 'nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_TNT',
               'custom-call.4'),
        kernel(pid, 7, 610.0, 300.0, 'cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64',
               'custom-call.5'),
        kernel(pid, 13, 500.0, 150.0, 'ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)',
               'all-to-all-start'),
        kernel(pid, 7, 910.0, 50.0, 'loop_fusion_3'),  # no args: its name
        kernel(pid, 7, 960.0, 25.0, 'input_reduce_fusion', 'fusion.1', module='jit_other'),
        kernel(pid, 13, 990.0, 25.0, 'MemcpyD2D'),  # no instruction
    ]
  events += [_x(1, 99, 10.0, 400.0, 'gemm_fusion_dot.2', hlo_op='gemm_fusion_dot.2'),
             _x(9, 5, 0.0, 30.0, 'ThunkExecutor', hlo_op='gemm_fusion_dot.2')]
  found = breakdown.device_events(dict(traceEvents=events))
  assert len(found) == 14 and {e.device for e in found} == {'/device:GPU:0', '/device:GPU:1'}
  r = breakdown.breakdown(found, breakdown.instructions(HLO), steps=1, module='jit_train_step')
  assert r['devices'] == 2 and r['device_names'] == ['/device:GPU:0', '/device:GPU:1']
  cats = r['categories']
  assert cats['expert_matmul'] == pytest.approx(0.4)
  assert cats['rest'] == pytest.approx(0.2)
  assert cats['attention'] == pytest.approx(0.3)
  assert cats['all_to_all'] == pytest.approx(0.15)
  assert cats['optimizer'] == pytest.approx(0.05)
  assert r['unattributed_ms'] == pytest.approx(0.05)
  assert r['busy_ms'] == pytest.approx(1.0)  # 10..1015 less the gap 985..990
  assert {n for n, _ in r['unattributed_top']} == {'input_reduce_fusion [jit_other]',
                                                   'MemcpyD2D'}


@pytest.fixture(scope='module')
def profiled():
  """A tiny MoE train step (4 experts over mesh expert=2) profiled for 2 steps on CPU."""
  cfg = tiny_config(**{'mesh.data': 1, 'mesh.expert': 2})
  cfg.model.vocab_size = 256
  b = harness.StepBench('tiny_ep2', cfg, devices=jax.devices()[:2])
  b.run(1, record=False)
  return b.hlo_text(), profile.profile_step(b, 2)


def test_scopes_reach_compiled_hlo(profiled):
  hlo, _ = profiled
  op_names = {i.op_name for i in breakdown.instructions(hlo).values()}
  for scope in breakdown.SCOPES:
    assert any(breakdown.scope_of(name) == scope for name in op_names), scope
  # Backward ops keep the labels.
  assert any(name.startswith('jit(train_step)/transpose(jvp(') and
             breakdown.scope_of(name) == 'experts' for name in op_names)


def test_real_cpu_profile(profiled):
  hlo, r = profiled
  present = {breakdown.category(i.opcode, i.op_name)
             for i in breakdown.instructions(hlo).values()}
  assert {'attention', 'expert_matmul', 'dispatch_combine', 'all_to_all', 'optimizer',
          'rest'} <= present
  for name in present:
    assert r['categories'][name] > 0, name
  assert r['devices'] == 2 and r['steps'] == 2
  assert r['unattributed_ms'] <= 0.1 * r['op_ms']
  assert 0 < r['busy_ms'] and r['step_ms'] > 0
  assert sum(r['shares'].values()) == pytest.approx(1.0)
  lines = profile.per_op_lines(r['per_op'], 5)
  assert len(lines) == 5 and all(' ms  ' in line for line in lines)
