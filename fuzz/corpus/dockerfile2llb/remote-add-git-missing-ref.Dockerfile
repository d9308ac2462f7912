FROM scratch
ADD {{GIT}}/repo.git#no-such-branch /r
