# Sanitizer builds: -DCDS_SANITIZE=address,undefined or -DCDS_SANITIZE=thread (any list the
# compiler's -fsanitize= accepts). Applied to every target of the project (libraries,
# generated code, cds-server, cdsctl, the tests); Debian's gRPC, Protobuf and Abseil stay
# uninstrumented. scripts/test-sanitizers.sh builds and runs both configurations with the
# runtime options and suppressions of sanitizers/.
set(CDS_SANITIZE "" CACHE STRING
    "Sanitizers for every target, e.g. address,undefined or thread (empty: none)")

if(CDS_SANITIZE)
  set(CDS_SANITIZE_FLAGS -fsanitize=${CDS_SANITIZE} -fno-omit-frame-pointer -g)
  if(CDS_SANITIZE MATCHES "undefined")
    # A UBSan finding aborts the process (and so fails its test) instead of being printed.
    list(APPEND CDS_SANITIZE_FLAGS -fno-sanitize-recover=undefined)
  endif()
  if(CDS_SANITIZE MATCHES "thread" AND CDS_SANITIZE MATCHES "address")
    message(FATAL_ERROR "CDS_SANITIZE: thread cannot be combined with address")
  endif()
  add_compile_options(${CDS_SANITIZE_FLAGS})
  add_link_options(${CDS_SANITIZE_FLAGS})
  if(CDS_SANITIZE MATCHES "thread")
    # Headers must describe Debian's libraries as they were built (without TSan): Protobuf's
    # map_field.h adds two members to MapFieldBase when __SANITIZE_THREAD__ is defined, so
    # code compiled with it and libprotobuf.so disagree on the layout of every map field
    # (operations_test crashed in Map::contains() on a google.protobuf.Struct that
    # libprotobuf had filled). Instrumentation does not depend on the macro.
    add_compile_options(-U__SANITIZE_THREAD__)
  endif()

  if(CDS_SANITIZE MATCHES "thread")
    # Debian's Abseil is not instrumented: without annotations TSan cannot see absl::Mutex
    # and reports every guarded field as racy. sanitizers/absl_tsan_annotations.cc wraps the
    # library's entry points (-Wl,--wrap) to tell TSan about the happens-before edges; it is
    # linked into every target declared after this point.
    set(_cds_tsan_source ${PROJECT_SOURCE_DIR}/sanitizers/absl_tsan_annotations.cc)
    file(STRINGS ${_cds_tsan_source} _cds_wrapped REGEX "^(void|bool) __wrap__Z")
    set(_cds_wrap_options)
    foreach(_line IN LISTS _cds_wrapped)
      string(REGEX MATCH "__wrap_(_Z[A-Za-z0-9_]+)" _unused "${_line}")
      list(APPEND _cds_wrap_options "LINKER:--wrap=${CMAKE_MATCH_1}")
    endforeach()
    add_library(cds_absl_tsan_annotations STATIC ${_cds_tsan_source})
    target_link_libraries(cds_absl_tsan_annotations PUBLIC absl::synchronization absl::time)
    add_link_options(${_cds_wrap_options})
    link_libraries(cds_absl_tsan_annotations)
  endif()
endif()

# Fuzzing: -DCDS_FUZZ=ON -DCMAKE_CXX_COMPILER=clang++-14 builds fuzz/'s targets as libFuzzer
# binaries; every target is compiled with coverage instrumentation for libFuzzer, ASan and
# UBSan (a UBSan finding is a crash). fuzz/run.sh configures and runs this.
option(CDS_FUZZ "Build fuzz/ as libFuzzer targets (clang++-14; else ctest replays their corpora)"
       OFF)
if(CDS_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "CDS_FUZZ needs clang (e.g. -DCMAKE_CXX_COMPILER=clang++-14)")
  endif()
  if(CDS_SANITIZE)
    message(FATAL_ERROR "CDS_FUZZ sets its own sanitizers (address,undefined): unset CDS_SANITIZE")
  endif()
  add_compile_options(-fsanitize=fuzzer-no-link,address,undefined
                      -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g)
  add_link_options(-fsanitize=address,undefined)
endif()
