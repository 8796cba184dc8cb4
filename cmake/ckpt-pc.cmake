# Run by `cmake --install` (install(CODE) in CMakeLists.txt): writes ckpt.pc for the prefix
# being installed to. CMAKE_INSTALL_PREFIX here is that prefix (a --prefix given to
# cmake --install included); DESTDIR is not part of it, as a staged package needs.
foreach(dir LIBDIR INCLUDEDIR)
  # GNUInstallDirs gives paths relative to the prefix unless the user set absolute ones.
  if(IS_ABSOLUTE "${CKPT_PC_${dir}}")
    set(CKPT_PC_${dir}_FULL "${CKPT_PC_${dir}}")
  else()
    set(CKPT_PC_${dir}_FULL "\${prefix}/${CKPT_PC_${dir}}")
  endif()
endforeach()
set(CKPT_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
configure_file("${CKPT_PC_IN}" "${CKPT_PC_OUT}" @ONLY)
